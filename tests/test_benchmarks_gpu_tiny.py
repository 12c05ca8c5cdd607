"""`python -m benchmarks gpu --tiny`: the GPU benchmark's CPU configuration runs end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.gpu import METHODS
from benchmarks.tasks import DEFAULT_GSM8K

pytestmark = pytest.mark.slow


def _data() -> Path:
    data = Path(os.environ.get("GRAFF_GSM8K_DIR", DEFAULT_GSM8K))
    if not (data / "train.jsonl").is_file():
        pytest.skip(f"GSM8K data not found in {data}; set GRAFF_GSM8K_DIR")
    return data


def test_tiny_mode_trains_every_method_to_its_clock(tmp_path: Path) -> None:
    data = _data()
    main(["gpu", "--tiny", "--seconds", "1.5", "--out", str(tmp_path), "--data-dir", str(data)])
    text = (tmp_path / "results.json").read_text()
    payload = json.loads(text)
    meta = payload["meta"]
    assert {"command", "git_commit", "date", "machine"} <= meta.keys()
    assert meta["machine"]["torch"] == torch.__version__
    assert meta["tiny"] is True
    assert 0.5e6 < meta["parameters"] < 2e6
    runs = {r["method"]: r for r in payload["runs"]}
    assert set(runs) == set(METHODS)
    for name, run in runs.items():
        assert run["status"] == "ok", run.get("error")
        assert math.isfinite(run["val_loss"])
        assert run["val_loss"] < math.log(meta["vocab_size"]) + 1.0  # not worse than uniform + 1
        assert run["steps"] >= 1
        assert run["train_seconds"] >= 1.5  # trained until its own clock ran out
        assert run["tokens_per_second"] > 0
        assert run["peak_memory_bytes"] is None  # CPU
        assert len(run["lr_curve"]) <= 200
        assert ("graff_overhead_share" in run) is (name == "graff")
    assert 0 < runs["graff"]["graff_overhead_share"] <= 1
    assert len(text.splitlines()) < 60  # compact: one line per run
    assert "| graff |" in (tmp_path / "results.md").read_text()


def test_without_a_gpu_the_full_mode_refuses_clearly(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"needs a CUDA GPU.*--tiny"):
        main(["gpu", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


def test_the_full_configuration_is_a_qwen3_model_of_100_to_300m_parameters() -> None:
    """Issue 18's GPU command: a Qwen3-architecture model of ~100-300M parameters built from a
    config (built on the meta device: no memory, no GPU needed to check its size)."""
    from benchmarks.gpu import FULL, build_model

    meta = torch.device("meta")
    with meta:
        model = build_model(FULL, FULL.vocab, seed=0, device=meta)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    params = sum(p.numel() for p in model.parameters())
    assert 100e6 <= params <= 300e6, params
    # the seed's micro-batch 8 x 8 accumulation
    assert (FULL.micro_batch, FULL.accum) == (8, 8)
