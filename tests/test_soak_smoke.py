"""CI smoke test of ``python -m benchmarks soak``: the same code path, a short run, invariants only.

Every scheduler trains the tiny LoRA Qwen3 for 120 steps with one NaN-loss step, one NaN-gradient
step, one gradient spike and one LR spike. ``soak_one`` raises if an LR ever leaves the clamp, a
parameter or the scheduler state becomes NaN, the final loss is not finite, or the skipped steps
are miscounted. No timing is asserted (the full soak records them).
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("peft")

from benchmarks import soak


@pytest.mark.parametrize("kind", soak.SCHEDULERS)
def test_short_soak_keeps_every_invariant(kind: str, one_torch_thread) -> None:
    result = soak.soak_one(kind, steps=120, samples=3)
    injected = result["injected"]
    assert injected["nan_loss"] == injected["nan_grad"] == 1
    assert injected["grad_spike"] == injected["lr_spike"] == 1
    assert result["skipped_steps"] == injected["skipped_optimizer_steps"] == 2
    assert math.isfinite(result["final_loss"])
    assert all(math.isfinite(lr) and lr > 0 for lr in result["final_lr"])
    assert result["held_items_growth"] <= 64  # bookkeeping does not grow with the steps


def test_soak_writes_json_and_markdown_with_provenance(tmp_path, one_torch_thread) -> None:
    from benchmarks.meta import provenance

    results = [soak.soak_one("budget", steps=40, samples=2)]
    soak.write(results, provenance() | {"wall_seconds": 1.0}, tmp_path)
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["meta"]["git_commit"]
    assert data["results"][0]["scheduler"] == "budget"
    assert "| budget | 40 |" in (tmp_path / "soak.md").read_text()
