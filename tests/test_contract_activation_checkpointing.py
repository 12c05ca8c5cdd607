"""Contract: activation checkpointing does not change the schedule.

Activation checkpointing (Hugging Face's ``gradient_checkpointing=True``, or
``torch.utils.checkpoint`` in a custom loop) runs forward code a second time during the backward
pass, to recompute what it did not store. Where the hooked modules sit inside the checkpointed
function, graff's forward hooks (the entropy probe on an early layer) fire again then. Those
recomputations are not training passes: counted, the planner would see each sampled pass twice
and the sampling stream would shift. The same seeded LoRA run with and without checkpointing
must give the same LRs, λ̂ and entropy readings: with Hugging Face's
``gradient_checkpointing_enable()`` and with ``torch.utils.checkpoint`` around the whole decoder
stack (the case that reads the recomputation unless graff skips passes run inside a backward).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_tiny_lora, make_tiny_qwen3

import graff

STEPS = 24


def _checkpoint_the_decoder_stack(base: torch.nn.Module) -> None:
    """``torch.utils.checkpoint`` around the whole decoder stack, as a custom training loop
    does: the hooked layer's forward (and so its forward hooks) runs again in the backward."""
    stack = base.model
    forward = stack.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    stack.forward = checkpointed


def _run(checkpointing: str | None) -> dict[str, Any]:
    base = make_tiny_qwen3(seed=0)
    if checkpointing == "hf":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing == "torch":
        _checkpoint_the_decoder_stack(base)
    model = make_tiny_lora(base)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sched = graff.GraffScheduler(opt, model=model, budget=graff.BudgetClock(steps=STEPS))
    gen = torch.Generator().manual_seed(1)
    lrs, readings = [], []
    for _ in range(STEPS):
        ids = torch.randint(0, 96, (2, 12), generator=gen)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        readings.append((sched.entropy_probe.calls, sched.entropy_probe.entropies.tolist()))
    return {"lrs": lrs, "readings": readings, "lambda_max": sched.curvature.lambda_max}


@pytest.mark.parametrize("checkpointing", ["hf", "torch"])
def test_checkpointed_layers_recomputed_in_backward_are_not_read_twice(checkpointing: str) -> None:
    plain, checkpointed = _run(None), _run(checkpointing)
    assert plain["readings"][-1][0] == STEPS  # one entropy pass per training forward
    assert checkpointed["readings"] == plain["readings"]
    assert checkpointed["lambda_max"] == pytest.approx(plain["lambda_max"], rel=1e-6)
    torch.testing.assert_close(checkpointed["lrs"], plain["lrs"], rtol=1e-6, atol=0.0)
