"""Synthetic and scikit-learn data for the meta-training task family (never the benchmark's data).

Every generator is a pure function of its seed (``numpy.random.Generator``), so one task spec
always gives the same data in any worker process. Char-level data share one vocabulary of
:data:`VOCAB` tokens (0 = padding, 1 = separator) so a LoRA base model pre-trained on one synthetic
language can be fine-tuned on any other. Nothing here reads GSM8K or ``load_digits``: the
benchmark's data sets (``benchmarks/tasks.py``) stay held out from the planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

VOCAB = 32  # tokens 0..31: 0 = pad, 1 = separator, 2.. = symbols
PAD, SEP, FIRST = 0, 1, 2
SEQ = 32  # tokens per training window (inputs; the labels are the same ids, shifted inside HF)


@dataclass(frozen=True)
class SeqData:
    """Token windows ``(N, SEQ)`` and labels (``-100`` where no loss), train and validation."""

    train_ids: Tensor
    train_labels: Tensor
    val_ids: Tensor
    val_labels: Tensor


@dataclass(frozen=True)
class ArrayData:
    """Feature arrays and targets (class ids, or standardised floats for regression)."""

    xt: Tensor
    yt: Tensor
    xv: Tensor
    yv: Tensor
    num_outputs: int
    regression: bool
    name: str


def _windows(stream: np.ndarray, n: int, rng: np.random.Generator) -> Tensor:
    starts = rng.integers(0, len(stream) - SEQ, size=n)
    return torch.as_tensor(np.stack([stream[s : s + SEQ] for s in starts]), dtype=torch.long)


def _split_stream(stream: np.ndarray, rng: np.random.Generator) -> SeqData:
    """Train windows from the first 85 % of a token stream, validation windows from the rest."""
    cut = int(0.85 * len(stream))
    train, val = _windows(stream[:cut], 2048, rng), _windows(stream[cut:], 128, rng)
    return SeqData(train, train.clone(), val, val.clone())


def markov_language(seed: int, length: int = 40_000) -> SeqData:
    """A random order-2 Markov chain over 8-24 symbols with sparse (Dirichlet 0.2) transitions."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 25))
    table = rng.dirichlet(np.full(n, 0.2), size=(n, n)).cumsum(axis=-1)
    chains = 64
    steps = length // chains
    out = np.empty((chains, steps), dtype=np.int64)
    out[:, :2] = rng.integers(0, n, size=(chains, 2))
    u = rng.random((chains, steps))
    for t in range(2, steps):
        cdf = table[out[:, t - 2], out[:, t - 1]]
        out[:, t] = np.minimum((cdf < u[:, t : t + 1]).sum(axis=1), n - 1)
    return _split_stream((out + FIRST).reshape(-1), rng)


def pcfg_language(seed: int, length: int = 40_000) -> SeqData:
    """Sentences of a random probabilistic context-free grammar, separated by ``SEP``.

    5-8 nonterminals with 2-4 rules of 1-4 symbols each; a rule refers only to later nonterminals
    or terminals, so every expansion terminates; rule probabilities are Dirichlet(1).
    """
    rng = np.random.default_rng(seed)
    terminals = int(rng.integers(8, 25))
    k = int(rng.integers(5, 9))
    rules: list[list[list[int]]] = []  # symbols >= 0: terminals; < 0: nonterminal -(j+1)
    probs: list[np.ndarray] = []
    for i in range(k):
        options = []
        for _ in range(int(rng.integers(2, 5))):
            rule = []
            for _ in range(int(rng.integers(1, 5))):
                if i + 1 < k and rng.random() < 0.45:
                    rule.append(-int(rng.integers(i + 1, k)) - 1)
                else:
                    rule.append(int(rng.integers(0, terminals)))
            options.append(rule)
        rules.append(options)
        probs.append(rng.dirichlet(np.ones(len(options))))

    def expand(symbol: int, out: list[int]) -> None:
        if symbol >= 0:
            out.append(symbol + FIRST)
            return
        i = -symbol - 1
        for s in rules[i][int(rng.choice(len(rules[i]), p=probs[i]))]:
            expand(s, out)

    stream: list[int] = []
    while len(stream) < length:
        expand(-1, stream)
        stream.append(SEP)
    return _split_stream(np.asarray(stream[:length]), rng)


ALGORITHMS = ("copy", "reverse", "sort", "addition")


def algorithmic(seed: int) -> SeqData:
    """Copy, reverse, sort or addition (chosen by the seed): ``input SEP output``, loss on outputs."""
    rng = np.random.default_rng(seed)
    kind = ALGORITHMS[int(rng.integers(0, len(ALGORITHMS)))]
    base = 10 if kind == "addition" else int(rng.integers(6, 20))
    k = int(rng.integers(4, 9)) if kind != "addition" else int(rng.integers(3, 7))

    def examples(n: int) -> tuple[Tensor, Tensor]:
        ids = np.full((n, SEQ), PAD, dtype=np.int64)
        labels = np.full((n, SEQ), -100, dtype=np.int64)
        for row in range(n):
            if kind == "addition":
                a, b = rng.integers(0, base**k, size=2)
                digits = [int(d) for d in f"{a:0{k}d}{b:0{k}d}"]
                out = [int(d) for d in f"{a + b:0{k + 1}d}"][::-1]  # little-endian: learnable
            else:
                digits = rng.integers(0, base, size=k).tolist()
                out = {
                    "copy": digits,
                    "reverse": digits[::-1],
                    "sort": sorted(digits),
                }[kind]
            seq = [d + FIRST for d in digits] + [SEP] + [d + FIRST for d in out]
            ids[row, : len(seq)] = seq
            labels[row, len(digits) + 1 : len(seq)] = seq[len(digits) + 1 :]
        return torch.as_tensor(ids), torch.as_tensor(labels)

    xt, yt = examples(2048)
    xv, yv = examples(128)
    return SeqData(xt, yt, xv, yv)


IMAGE_SIZE = 12


def shapes(seed: int, n_train: int = 2048, n_val: int = 256) -> ArrayData:
    """Synthetic 12×12 images: oriented bars (4-8 orientations) or five shapes, with noise.

    Position, size and thickness jitter per image; Gaussian pixel noise (σ 0.15-0.4, per task).
    """
    rng = np.random.default_rng(seed)
    bars = bool(rng.random() < 0.5)
    classes = int(rng.integers(4, 9)) if bars else 5
    noise = float(rng.uniform(0.15, 0.4))
    n = n_train + n_val
    y = rng.integers(0, classes, size=n)
    grid = np.arange(IMAGE_SIZE) - (IMAGE_SIZE - 1) / 2
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    cx = rng.uniform(-2, 2, size=(n, 1, 1))
    cy = rng.uniform(-2, 2, size=(n, 1, 1))
    dx, dy = xx[None] - cx, yy[None] - cy
    size = rng.uniform(2.5, 4.0, size=(n, 1, 1))
    width = rng.uniform(0.6, 1.1, size=(n, 1, 1))
    if bars:
        theta = (y[:, None, None] + rng.uniform(-0.2, 0.2, size=(n, 1, 1))) * math.pi / classes
        across = np.abs(-np.sin(theta) * dx + np.cos(theta) * dy)
        along = np.abs(np.cos(theta) * dx + np.sin(theta) * dy)
        img = np.exp(-((across / width) ** 2)) * (along < size)
    else:
        r = np.sqrt(dx**2 + dy**2)
        cheb = np.maximum(np.abs(dx), np.abs(dy))
        kinds = [
            r < size,  # disk
            np.abs(r - size) < width,  # ring
            np.abs(cheb - size) < width,  # square outline
            ((np.abs(dx) < width) | (np.abs(dy) < width)) & (cheb < size),  # plus
            ((np.abs(dx - dy) < width) | (np.abs(dx + dy) < width)) & (r < size),  # x
        ]
        img = np.select([y[:, None, None] == c for c in range(5)], kinds, False).astype(float)
    img = img + noise * rng.standard_normal(img.shape)
    x = torch.as_tensor(img.reshape(n, -1), dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    name = f"bars{classes}" if bars else "shapes5"
    return ArrayData(x[:n_train], yt[:n_train], x[n_train:], yt[n_train:], classes, False, name)


TABULAR = ("iris", "wine", "breast_cancer", "diabetes", "moons", "classification")


def tabular(seed: int) -> ArrayData:
    """A scikit-learn data set chosen by the seed (never ``load_digits``), split 75/25, standardised.

    ``diabetes`` is a regression (targets standardised on the train split, MSE loss).
    """
    from sklearn import datasets

    rng = np.random.default_rng(seed)
    name = TABULAR[int(rng.integers(0, len(TABULAR)))]
    data_seed = int(rng.integers(0, 2**31 - 1))
    if name == "moons":
        x, y = datasets.make_moons(
            1000, noise=float(rng.uniform(0.15, 0.35)), random_state=data_seed
        )
    elif name == "classification":
        x, y = datasets.make_classification(
            1000,
            n_features=int(rng.integers(8, 21)),
            n_informative=6,
            n_classes=int(rng.integers(2, 5)),
            random_state=data_seed,
        )
    else:
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    perm = rng.permutation(len(x))
    cut = int(0.75 * len(x))
    x = np.asarray(x, dtype=np.float64)[perm]
    y = np.asarray(y)[perm]
    mean, std = x[:cut].mean(axis=0), x[:cut].std(axis=0) + 1e-8
    x = torch.as_tensor((x - mean) / std, dtype=torch.float32)
    regression = name == "diabetes"
    if regression:
        y = (y - y[:cut].mean()) / y[:cut].std()
        yt = torch.as_tensor(y, dtype=torch.float32)[:, None]
        outputs = 1
    else:
        yt = torch.as_tensor(y, dtype=torch.long)
        outputs = int(y.max()) + 1
    return ArrayData(x[:cut], yt[:cut], x[cut:], yt[cut:], outputs, regression, name)
