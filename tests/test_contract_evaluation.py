"""Contract: evaluating the model between steps does not change the schedule.

A torch scheduler's LRs are a function of its step count; frameworks (Hugging Face's
``Trainer``, Lightning) evaluate whenever the user asks, under ``torch.no_grad()`` or
``torch.inference_mode()``, and expect the training run to be the same either way. GRAFF reads
the model's forward passes (the early-layer entropy probe, the captured loss), so an evaluation
pass must be invisible to it: the same seeded run with and without evaluation passes before
the first step (where the λ̂ probe batch is captured) and in between must give bit-identical
LRs, parameters and entropy readings. ``CosineAnnealingLR`` runs beside
it as the control.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import lm_training_step, make_tiny_lora, make_tiny_qwen3

import graff

STEPS = 30  # three planning windows of the default plan_every=10


def _batch(gen: torch.Generator, vocab: int = 96) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _graff(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
    return graff.GraffScheduler(opt, model=model, budget=graff.BudgetClock(steps=STEPS))


def _cosine(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def _run(make: Callable[..., Any], evaluate: Callable[[torch.nn.Module], None] | None) -> dict:
    model = make_tiny_lora(make_tiny_qwen3(seed=0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sched = make(model, opt)
    train_gen = torch.Generator().manual_seed(1)
    lrs, entropies = [], []
    if evaluate is not None:  # a sanity-check evaluation before training (Lightning runs one)
        evaluate(model)
    for step in range(STEPS):
        lr, reading = lm_training_step(model, opt, sched, _batch(train_gen))
        lrs.append(lr)
        if reading is not None:
            entropies.append(reading)
        if evaluate is not None and step % 3 == 0:
            evaluate(model)
    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    if hasattr(sched, "remove"):
        sched.remove()
    return {"lrs": lrs, "entropies": entropies, "params": params}


def _eval_no_grad(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            model(**_batch(gen))
    model.train()


def _eval_inference_mode(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(8)
    with torch.inference_mode():  # model left in train mode: only the grad mode says "eval"
        model(**_batch(gen))


@pytest.mark.parametrize("make", [_graff, _cosine], ids=["graff", "torch-cosine"])
@pytest.mark.parametrize(
    "evaluate", [_eval_no_grad, _eval_inference_mode], ids=["no_grad", "inference_mode"]
)
def test_evaluation_between_steps_leaves_the_run_unchanged(make, evaluate) -> None:
    plain = _run(make, None)
    with_eval = _run(make, evaluate)
    assert with_eval["lrs"] == plain["lrs"]
    assert with_eval["entropies"] == plain["entropies"]
    for a, b in zip(with_eval["params"], plain["params"], strict=True):
        assert torch.equal(a, b)
    if make is _graff:  # the probe did read the training passes
        assert plain["entropies"]
        assert plain["entropies"][-1][0] > 0
        assert len(set(plain["lrs"])) > 1
