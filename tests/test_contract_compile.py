"""Contract: a ``torch.compile``-d model is scheduled exactly as the same model run eagerly.

Compiling the model is the usual way to speed up a GPU fine-tune (``torch.compile(model)``,
``model.compile()``, Hugging Face's ``TrainingArguments(torch_compile=True)``), and a torch
scheduler does not care: it never touches the model. GRAFF does, in two ways that compiled
graphs break unless graff takes care:

- the λ̂ probe takes Hessian-vector products by double backward, which compiled graphs do not
  support ("torch.compile with aot_autograd does not currently support double backward"): the
  run crashed at the first estimate, 10 steps in;
- graff's forward hooks keep Python state (counters, sampled token positions, running sums);
  traced into the graph, each call's new counter value failed a guard, so the model recompiled
  on every step, and the side effects ran once, at tracing time.

So the same seeded LoRA run, compiled (``backend="aot_eager"``: the same kernels as eager, no
C++ toolchain needed) and eager, must give the same LRs, λ̂ and entropy readings, and the
compiled model must stop recompiling once it has warmed up. ``CosineAnnealingLR`` on the
compiled model is the control for the graph count.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import lm_training_step, make_tiny_lora, make_tiny_qwen3

import graff

pytestmark = pytest.mark.skipif(
    not hasattr(torch.compiler, "set_stance"),
    reason="graff runs compiled models' probes eagerly via torch.compiler.set_stance (torch>=2.6)",
)

STEPS = 24  # the first λ̂ at step 10, two planning windows after it


def _batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 96, (2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _run(compile_mode: str | None, scheduler: str = "graff") -> dict[str, Any]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_tiny_lora(make_tiny_qwen3(seed=0))
    model.train()
    trained: torch.nn.Module = model
    if compile_mode in ("wrap", "wrapped_after"):
        trained = torch.compile(model, backend="aot_eager")
    elif compile_mode == "in_place":
        model.compile(backend="aot_eager")
    # "wrapped_after": the scheduler gets the model as built and the compiled wrapper trains,
    # as with TrainingArguments(torch_compile=True): every graff hook sits inside the graph
    given = model if compile_mode == "wrapped_after" else trained
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    if scheduler == "graff":
        sched: Any = graff.GraffScheduler(opt, model=given, budget=graff.BudgetClock(steps=STEPS))
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    gen = torch.Generator().manual_seed(1)
    lrs, entropies, graphs = [], [], []
    for _ in range(STEPS):
        lr, reading = lm_training_step(trained, opt, sched, _batch(gen))
        lrs.append(lr)
        if reading is not None:
            entropies.append(reading)
        graphs.append(counters["stats"]["unique_graphs"])
    curvature = getattr(sched, "curvature", None)
    return {
        "lrs": lrs,
        "entropies": entropies,
        "lambda_max": None if curvature is None else curvature.lambda_max,
        "graphs": graphs,
    }


_RUNS: dict[tuple[str | None, str], dict[str, Any]] = {}


def _cached(compile_mode: str | None, scheduler: str = "graff") -> dict[str, Any]:
    """Each run once per session (compiling takes seconds); the tests only read them."""
    key = (compile_mode, scheduler)
    if key not in _RUNS:
        _RUNS[key] = _run(compile_mode, scheduler)
    return _RUNS[key]


@pytest.mark.parametrize("compile_mode", ["wrap", "in_place", "wrapped_after"])
def test_a_compiled_model_gets_the_eager_schedule(compile_mode: str) -> None:
    eager_run, compiled = _cached(None), _cached(compile_mode)
    assert eager_run["lambda_max"] is not None  # the estimate the compiled run crashed at
    assert compiled["lambda_max"] == pytest.approx(eager_run["lambda_max"], rel=1e-5)
    torch.testing.assert_close(compiled["lrs"], eager_run["lrs"], rtol=1e-5, atol=0.0)
    assert [c for c, _ in compiled["entropies"]] == [c for c, _ in eager_run["entropies"]]
    torch.testing.assert_close(
        [e for _, e in compiled["entropies"]], [e for _, e in eager_run["entropies"]]
    )
    assert len(set(eager_run["lrs"])) > 5  # the schedule moved: the comparison means something


@pytest.mark.parametrize("compile_mode", ["wrap", "in_place"])
def test_graff_hooks_do_not_recompile_the_model_every_step(compile_mode: str) -> None:
    control, compiled = _cached(compile_mode, "cosine"), _cached(compile_mode)
    # the control compiles once and never again; graff's hooks add a fixed number of graphs
    # (the graph breaks where they run eagerly), none after the first steps
    assert control["graphs"][-1] == control["graphs"][0]
    warm = compiled["graphs"][STEPS // 2 - 1]
    assert compiled["graphs"][-1] == warm, compiled["graphs"]
    assert warm <= control["graphs"][-1] + 8


def test_without_the_eager_stance_a_compiled_model_runs_on_without_lambda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch < 2.6: no set_stance, so the double backward reaches the compiled graph; the
    # probe then says why and switches λ̂ off (as without loss_fn), and training goes on
    monkeypatch.delattr(torch.compiler, "set_stance")
    torch._dynamo.reset()
    model = make_tiny_lora(make_tiny_qwen3(seed=0))
    model.compile(backend="aot_eager")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sched = graff.GraffScheduler(opt, model=model, budget=graff.BudgetClock(steps=STEPS))
    gen = torch.Generator().manual_seed(1)

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(**_batch(gen)).loss.backward()
            opt.step()
            sched.step()

    with pytest.warns(graff.errors.ProbeWarning, match="torch.compiler.set_stance"):
        train(14)
    assert sched.curvature.lambda_max is None
    assert not sched.curvature.hvp
    assert sched.last_epoch == 14
    assert 0 < opt.param_groups[0]["lr"] < float("inf")


def test_the_entropy_probe_finds_the_layers_of_a_compiled_model() -> None:
    # torch.compile keeps the model as _orig_mod: without a peft wrapper in between (whose
    # get_base_model the compiled wrapper forwards), the probe used to find no decoder layers
    # and GRAFF ran without entropy features on the compiled model only
    model = make_tiny_qwen3(seed=0)
    compiled = graff.EntropyProbe(torch.compile(model, backend="aot_eager"))
    assert compiled._layer is model.model.layers[0]  # the default layer_index


def test_reactor_on_a_compiled_model_plans_the_eager_lrs() -> None:
    # REACTOR shares the hooks and probes: with its guard on (λ̂ by double backward) too
    def run(compiled: bool) -> tuple[list[float], float | None]:
        torch._dynamo.reset()
        model = make_tiny_lora(make_tiny_qwen3(seed=0))
        model.train()
        trained = torch.compile(model, backend="aot_eager") if compiled else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        sched = graff.ReactorScheduler(
            opt, model=trained, budget=graff.BudgetClock(steps=STEPS), guard=True, seed=0
        )
        gen = torch.Generator().manual_seed(1)
        lrs = [lm_training_step(trained, opt, sched, _batch(gen))[0] for _ in range(STEPS)]
        return lrs, sched.curvature_probe.lambda_max

    (eager_lrs, eager_lam), (lrs, lam) = run(False), run(True)
    assert eager_lam is not None
    assert lam == pytest.approx(eager_lam, rel=1e-5)
    torch.testing.assert_close(lrs, eager_lrs, rtol=1e-5, atol=0.0)
