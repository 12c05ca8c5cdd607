"""GSM8K loading (Hugging Face ``openai/gsm8k`` or local JSONL) and causal-LM batching."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scoring import format_prompt, format_target

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "gsm8k"


@dataclass(frozen=True)
class Example:
    """One GSM8K item."""

    question: str
    answer: str


def _read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise FileNotFoundError(
            f"GSM8K file {path} not found. Pass --data-dir (or set GRAFF_GSM8K_DIR) to a folder "
            "with train.jsonl and test.jsonl in the openai/grade-school-math format."
        )
    items = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{lineno} lacks a 'question' or 'answer' field.")
            items.append(Example(row["question"], row["answer"]))
    return items


def load_gsm8k(data_dir: str | Path | None) -> tuple[list[Example], list[Example], str]:
    """Train and test splits and a description of their source.

    Args:
        data_dir: Folder with ``train.jsonl``/``test.jsonl``. ``None``: the Hugging Face
            dataset ``openai/gsm8k`` (config ``main``) when ``datasets`` is installed, else
            ``$GRAFF_GSM8K_DIR``, else ``../shared/data/gsm8k`` next to the repository.

    Raises:
        FileNotFoundError: if the local files are missing.
    """
    if data_dir is None and importlib.util.find_spec("datasets") is not None:
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", "main")
        splits = [[Example(r["question"], r["answer"]) for r in ds[s]] for s in ("train", "test")]
        return splits[0], splits[1], "hf:openai/gsm8k/main"
    if data_dir is None:
        data_dir = os.environ.get("GRAFF_GSM8K_DIR", DEFAULT_DATA_DIR)
    folder = Path(data_dir)
    return _read_jsonl(folder / "train.jsonl"), _read_jsonl(folder / "test.jsonl"), str(folder)


def collate(tokenizer: Any, items: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM batch; the loss covers only the answer tokens and EOS."""
    ids, labels = [], []
    for ex in items:
        prompt = tokenizer(format_prompt(ex.question), add_special_tokens=False)["input_ids"]
        target = tokenizer(format_target(ex.answer), add_special_tokens=False)["input_ids"]
        target = [*target, tokenizer.eos_token_id]
        seq = (prompt + target)[:max_length]
        lab = ([-100] * len(prompt) + target)[:max_length]
        ids.append(seq)
        labels.append(lab)
    width = max(len(s) for s in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


class BatchStream:
    """An endless, seeded, resumable stream of micro-batches of training examples."""

    def __init__(self, items: list[Example], batch_size: int, seed: int) -> None:
        if batch_size < 1 or not items:
            raise ValueError(f"need items and batch_size >= 1, got {len(items)}, {batch_size}.")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.position = 0  # micro-batches drawn so far

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.items), generator=g).tolist()

    def next(self) -> list[Example]:
        """The next micro-batch (reshuffled each epoch, deterministic given seed and position)."""
        per_epoch = max(1, len(self.items) // self.batch_size)
        epoch, k = divmod(self.position, per_epoch)
        order = self._order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        self.position += 1
        return [self.items[i] for i in order]
