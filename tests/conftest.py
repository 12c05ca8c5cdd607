"""Shared fixtures: a fake clock, GSM8K data location, and a tiny Qwen3 with peft LoRA adapters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


class FakeTime:
    """A controllable time source for BudgetClock: tests advance it instead of sleeping."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: tiny models are faster so, and leave the other core free."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """Folder with GSM8K ``train.jsonl``/``test.jsonl`` (env ``GRAFF_GSM8K_DIR``), else skip."""
    path = Path(os.environ.get("GRAFF_GSM8K_DIR", DEFAULT_GSM8K))
    if not (path / "train.jsonl").is_file():
        pytest.skip(
            f"GSM8K data not found in {path}; set GRAFF_GSM8K_DIR to the folder with train.jsonl"
        )
    return path


def make_tiny_qwen3(vocab_size: int = 96, num_layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Qwen3 causal LM built from a config (no download), in float32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen3ForCausalLM(config)
    return model.float().eval()


def make_tiny_lora(model: torch.nn.Module, r: int = 4, dropout: float = 0.0) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters on attention and MLP projections."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=16,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    lora = peft.get_peft_model(model, cfg)
    for name, p in lora.named_parameters():  # peft zero-inits lora_B; make it non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return lora


def lm_training_step(model, opt, sched, batch: dict[str, torch.Tensor]) -> tuple[float, object]:
    """One step of a tiny causal-LM run: forward, backward, ``opt.step()``, ``sched.step()``.

    Returns the LR of the first group after the step, and the scheduler's entropy-probe reading
    ``(calls, entropies)`` (``None`` for a scheduler without one): what the contract tests compare.
    """
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    opt.step()
    sched.step()
    probe = getattr(sched, "entropy_probe", None)
    reading = None if probe is None else (probe.calls, probe.entropies.tolist())
    return opt.param_groups[0]["lr"], reading


@pytest.fixture
def tiny_qwen3() -> torch.nn.Module:
    return make_tiny_qwen3()


@pytest.fixture
def tiny_lora_qwen3() -> torch.nn.Module:
    return make_tiny_lora(make_tiny_qwen3())


@pytest.fixture
def token_batch() -> dict[str, torch.Tensor]:
    """A batch of 2 sequences of 12 random token ids with labels (causal-LM loss)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture
def cheap_lora_base(monkeypatch):
    """metatrain's LoRA tasks on a 3-step base model instead of the 300-step one (the cache is
    keyed by the step count)."""
    from metatrain import tasks

    monkeypatch.setattr(tasks, "LORA_BASE_STEPS", 3)
