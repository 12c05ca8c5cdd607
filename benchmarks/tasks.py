"""Benchmark tasks: CPU-sized, real data, offline.

Each task builds a model for a seed and exposes ``train_loss(model, step, gen)`` (one minibatch)
and ``val_loss(model)`` (held-out loss, the quality metric). Data order is drawn from a generator
seeded by the run's seed, so two schedulers with the same seed see the same batches.

A task may declare its optimizer (``optimizer = "sgd"``: SGD with momentum 0.9 for every variant
that takes an LR), the user's LR for it (``default_lr``) and its ``weight_decay``; without them a
task trains with AdamW at 1e-3 and weight decay 0.01 (``benchmarks.suites.task_optimizer``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


def gsm8k_dir(data_dir: str | Path | None = None) -> Path:
    """Resolve the GSM8K folder: ``--data-dir``, else ``GRAFF_GSM8K_DIR``, else the default."""
    path = Path(data_dir or os.environ.get("GRAFF_GSM8K_DIR", DEFAULT_GSM8K))
    if not (path / "train.jsonl").is_file():
        raise FileNotFoundError(
            f"GSM8K train.jsonl not found in {path}; pass --data-dir or set GRAFF_GSM8K_DIR."
        )
    return path


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- digits MLP
@dataclass
class DigitsTask:
    """MLP 64-128-10 on scikit-learn's digits (1797 images), cross-entropy, batch 64."""

    steps: int
    hidden: int = 128
    batch: int = 64
    name: str = "digits_mlp"
    _data: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def setup(self, data_dir: Path | None = None) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        x, y = x[perm], y[perm]
        self._data = {"xt": x[:1400], "yt": y[:1400], "xv": x[1400:], "yv": y[1400:]}

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def train_loss(self, model: nn.Module, gen: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(self._data["xt"]), (self.batch,), generator=gen)
        return nn.functional.cross_entropy(model(self._data["xt"][idx]), self._data["yt"][idx])

    def probe_loss_fn(self, model: nn.Module) -> Any:
        xs, ys = self._data["xt"][:256], self._data["yt"][:256]
        return lambda: nn.functional.cross_entropy(model(xs), ys)

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        return float(nn.functional.cross_entropy(model(self._data["xv"]), self._data["yv"]))


# --------------------------------------------------------------------------- digits CNN, SGD
@dataclass
class DigitsCnnTask(DigitsTask):
    """A small CNN on the 8×8 digits images, trained with SGD + momentum 0.9 (batch 64).

    conv 3×3 (1→16) - ReLU - conv 3×3 (16→32) - ReLU - max-pool 2 - linear 512→10. Every variant
    that takes an LR uses ``SGD(momentum=0.9, weight_decay=5e-4)`` at the user's LR 0.05 × the
    multiplier; the anchors use their SGD flavour where one exists. Same split as ``digits_mlp``.
    """

    channels: int = 16
    name: str = "digits_cnn_sgd"
    optimizer: str = "sgd"
    default_lr: float = 0.05
    weight_decay: float = 5e-4

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        c = self.channels
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * c * 16, 10),
        )


# --------------------------------------------------------------------------- char-level Qwen3
class CharTokenizer:
    """Character-level tokenizer over the characters of the GSM8K train split (0 = pad/unknown)."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]


def tiny_qwen3(vocab_size: int, hidden: int, layers: int, seq: int, seed: int) -> nn.Module:
    """A small Qwen3ForCausalLM built from a ``transformers.Qwen3Config`` (no download)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max(seq, 64),
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return transformers.Qwen3ForCausalLM(config).float()


def _gsm8k_text(rows: list[dict[str, str]]) -> str:
    return "".join(f"Q: {r['question']}\nA: {r['answer']}\n\n" for r in rows)


@dataclass
class Gsm8kLMTask:
    """Character-level Qwen3 language model on GSM8K text (train split; val = test split).

    Held-out metric: mean next-character loss (nats/char) on fixed windows of the test split.
    """

    steps: int
    hidden: int = 64
    layers: int = 2
    seq: int = 64
    batch: int = 16
    val_windows: int = 64
    name: str = "gsm8k_qwen3"
    _train: Tensor | None = field(default=None, repr=False)
    _val: Tensor | None = field(default=None, repr=False)
    tokenizer: CharTokenizer | None = field(default=None, repr=False)

    def setup(self, data_dir: Path | None = None) -> None:
        root = gsm8k_dir(data_dir)
        train_text = _gsm8k_text(_read_jsonl(root / "train.jsonl"))
        test_text = _gsm8k_text(_read_jsonl(root / "test.jsonl"))
        self.tokenizer = CharTokenizer(train_text)
        self._train = torch.tensor(self.tokenizer.encode(train_text), dtype=torch.long)
        test = torch.tensor(self.tokenizer.encode(test_text), dtype=torch.long)
        starts = torch.linspace(0, len(test) - self.seq - 2, self.val_windows).long()
        self._val = torch.stack([test[s : s + self.seq + 1] for s in starts])

    def build(self, seed: int) -> nn.Module:
        assert self.tokenizer is not None
        return tiny_qwen3(self.tokenizer.vocab_size, self.hidden, self.layers, self.seq, seed)

    def _batch(self, gen: torch.Generator) -> Tensor:
        assert self._train is not None
        starts = torch.randint(0, len(self._train) - self.seq - 2, (self.batch,), generator=gen)
        return torch.stack([self._train[s : s + self.seq + 1] for s in starts.tolist()])

    def train_loss(self, model: nn.Module, gen: torch.Generator) -> Tensor:
        ids = self._batch(gen)
        return model(input_ids=ids, labels=ids).loss

    def probe_loss_fn(self, model: nn.Module) -> Any:
        ids = self._batch(torch.Generator().manual_seed(99))
        return lambda: model(input_ids=ids, labels=ids).loss

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        assert self._val is not None
        was_training = model.training
        model.eval()
        loss = float(model(input_ids=self._val, labels=self._val).loss)
        model.train(was_training)
        return loss


# --------------------------------------------------------------------------- LoRA fine-tuning
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraTask:
    """LoRA (r 64, α 16) fine-tuning of a pre-trained char-level Qwen3 on GSM8K answers.

    The base model is pre-trained once per process (seed 0, ``pretrain_steps`` of AdamW on the
    first half of the train split, as plain text). Fine-tuning uses the second half as
    question → answer pairs with the loss on answer characters only; the metric is the held-out
    answer loss on the test split. Exact match is not reported: a model this small gets 0 %.
    """

    steps: int
    pretrain_steps: int = 300
    hidden: int = 64
    layers: int = 2
    prompt_chars: int = 64
    answer_chars: int = 96
    batch: int = 16
    val_examples: int = 64
    rank: int = 64
    alpha: int = 16
    name: str = "gsm8k_lora"
    _lm: Gsm8kLMTask | None = field(default=None, repr=False)
    _base_state: dict[str, Tensor] | None = field(default=None, repr=False)
    _train: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _val: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def setup(self, data_dir: Path | None = None) -> None:
        root = gsm8k_dir(data_dir)
        train_rows = _read_jsonl(root / "train.jsonl")
        half = len(train_rows) // 2
        seq = self.prompt_chars + self.answer_chars
        lm = Gsm8kLMTask(steps=self.pretrain_steps, hidden=self.hidden, layers=self.layers, seq=seq)
        lm.setup(data_dir)
        assert lm.tokenizer is not None
        lm._train = torch.tensor(lm.tokenizer.encode(_gsm8k_text(train_rows[:half])))
        self._lm = lm
        self._train = self._pairs(train_rows[half:])
        val_rows = _read_jsonl(root / "test.jsonl")[: self.val_examples]
        self._val = self._pairs(val_rows)
        self._base_state = self._pretrain(lm)

    def _pairs(self, rows: list[dict[str, str]]) -> tuple[Tensor, Tensor]:
        assert self._lm is not None
        assert self._lm.tokenizer is not None
        enc = self._lm.tokenizer.encode
        seq = self.prompt_chars + self.answer_chars
        ids = torch.zeros(len(rows), seq, dtype=torch.long)
        labels = torch.full((len(rows), seq), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = enc(("Q: " + row["question"])[-(self.prompt_chars - 4) :] + "\nA: ")
            answer = enc(row["answer"] + "\n")[: seq - len(prompt)]
            ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        return ids, labels

    def _pretrain(self, lm: Gsm8kLMTask) -> dict[str, Tensor]:
        model = lm.build(seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=self.pretrain_steps)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(self.pretrain_steps):
            opt.zero_grad(set_to_none=True)
            lm.train_loss(model, gen).backward()
            opt.step()
            sched.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build(self, seed: int) -> nn.Module:
        import peft

        assert self._lm is not None
        assert self._base_state is not None
        base = self._lm.build(seed=0)
        base.load_state_dict(self._base_state)
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS
        )
        return peft.get_peft_model(base, config)

    def _batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        assert self._train is not None
        idx = torch.randint(0, len(self._train[0]), (self.batch,), generator=gen)
        return self._train[0][idx], self._train[1][idx]

    def train_loss(self, model: nn.Module, gen: torch.Generator) -> Tensor:
        ids, labels = self._batch(gen)
        return model(input_ids=ids, labels=labels).loss

    def probe_loss_fn(self, model: nn.Module) -> Any:
        ids, labels = self._batch(torch.Generator().manual_seed(99))
        return lambda: model(input_ids=ids, labels=labels).loss

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        assert self._val is not None
        was_training = model.training
        model.eval()
        loss = float(model(input_ids=self._val[0], labels=self._val[1]).loss)
        model.train(was_training)
        return loss
