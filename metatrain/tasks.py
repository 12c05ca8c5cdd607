"""Meta-training tasks: (data family × architecture), each CPU-cheap (a step ≲ 10 ms, 1 thread).

Every task exposes the benchmark's interface (``benchmarks/tasks.py``) so the same loop trains
it: ``build(seed)``, ``train_loss(model, gen)``, ``probe_loss_fn(model)`` (a fixed probe batch
for λ̂) and ``val_loss(model)`` (the held-out split). Data and the LoRA base model are cached per
process, keyed by their seed.

=============  ============================  =======================================
data family    architectures                 data
=============  ============================  =======================================
markov         transformer, lora             random order-2 Markov chain language
pcfg           transformer, lora             random probabilistic grammar (meta-val only)
algorithmic    transformer, lora             copy / reverse / sort / addition
tabular        mlp                           iris, wine, breast_cancer, diabetes (MSE),
                                             make_moons, make_classification
shapes         mlp, cnn                      12×12 oriented bars or five shapes + noise
=============  ============================  =======================================

The transformer is a tiny ``transformers.LlamaForCausalLM`` built from a config (the benchmark
uses Qwen3); ``lora`` is peft LoRA (r 8) on such a model pre-trained for 300 steps on a fixed
Markov language (seed :data:`LORA_BASE_SEED`, a language no task draws).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from metatrain import data

ARCHS = {
    "markov": ("transformer", "lora"),
    "pcfg": ("transformer", "lora"),
    "algorithmic": ("transformer", "lora"),
    "tabular": ("mlp",),
    "shapes": ("mlp", "cnn"),
}
#: The user's LR per (architecture, optimizer) the LR factor multiplies (a sensible default).
DEFAULT_LR = {
    ("mlp", "adamw"): 3e-3,
    ("mlp", "sgd"): 0.05,
    ("cnn", "adamw"): 3e-3,
    ("cnn", "sgd"): 0.05,
    ("transformer", "adamw"): 3e-3,
    ("transformer", "sgd"): 0.1,
    ("lora", "adamw"): 3e-3,
    ("lora", "sgd"): 0.1,
}
LORA_BASE_STEPS = 300
LORA_BASE_SEED = 2**31 - 1  # outside both seed ranges of the sampler
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
BATCH = 32  # array tasks
SEQ_BATCH = 16  # sequence tasks


def tiny_llama(seed: int) -> nn.Module:
    """A 2-layer, 32-wide ``LlamaForCausalLM`` over :data:`data.VOCAB` tokens (no download)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=data.VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=data.SEQ,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).float()


def lora_base_state() -> dict[str, Tensor]:
    """Weights of the LoRA base model: AdamW (3e-3, one-cycle) for :data:`LORA_BASE_STEPS`
    steps on a fixed Markov language; trained once per process (per step count)."""
    return _pretrain_base(LORA_BASE_STEPS)


@lru_cache(maxsize=4)
def _pretrain_base(steps: int) -> dict[str, Tensor]:
    lang = data.markov_language(LORA_BASE_SEED)
    model = tiny_llama(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(lang.train_ids), (SEQ_BATCH,), generator=gen)
        ids = lang.train_ids[idx]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@lru_cache(maxsize=32)
def _seq_data(family: str, seed: int) -> data.SeqData:
    make = {
        "markov": data.markov_language,
        "pcfg": data.pcfg_language,
        "algorithmic": data.algorithmic,
    }[family]
    return make(seed)


@lru_cache(maxsize=32)
def _array_data(family: str, seed: int) -> data.ArrayData:
    return data.tabular(seed) if family == "tabular" else data.shapes(seed)


class SequenceTask:
    """A char-level causal LM task (transformer from scratch, or LoRA on the pre-trained base)."""

    def __init__(self, family: str, arch: str, seed: int) -> None:
        self.family, self.arch = family, arch
        self.data = _seq_data(family, seed)

    def build(self, seed: int) -> nn.Module:
        if self.arch == "transformer":
            model = tiny_llama(seed)
        else:
            import peft

            model = tiny_llama(0)
            model.load_state_dict(lora_base_state())
            torch.manual_seed(seed)
            config = peft.LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS
            )
            with warnings.catch_warnings():  # peft reads a deprecated transformers alias
                warnings.simplefilter("ignore", FutureWarning)
                model = peft.get_peft_model(model, config)
        model.train()
        return model

    def train_loss(self, model: nn.Module, gen: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(self.data.train_ids), (SEQ_BATCH,), generator=gen)
        return model(input_ids=self.data.train_ids[idx], labels=self.data.train_labels[idx]).loss

    def probe_loss_fn(self, model: nn.Module) -> Callable[[], Tensor]:
        ids, labels = self.data.train_ids[:SEQ_BATCH], self.data.train_labels[:SEQ_BATCH]
        return lambda: model(input_ids=ids, labels=labels).loss

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        loss = float(model(input_ids=self.data.val_ids, labels=self.data.val_labels).loss)
        model.train(was)
        return loss


class ArrayTask:
    """Classification (cross-entropy) or regression (MSE) on feature arrays: MLP or small CNN."""

    def __init__(self, family: str, arch: str, seed: int) -> None:
        self.family, self.arch = family, arch
        self.data = _array_data(family, seed)

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        d, k = self.data.xt.shape[1], self.data.num_outputs
        if self.arch == "mlp":
            return nn.Sequential(
                nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, k)
            )
        side = data.IMAGE_SIZE
        return nn.Sequential(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (side // 4) ** 2, k),
        )

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.data.regression:
            return nn.functional.mse_loss(out, y)
        return nn.functional.cross_entropy(out, y)

    def train_loss(self, model: nn.Module, gen: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(self.data.xt), (BATCH,), generator=gen)
        return self._loss(model(self.data.xt[idx]), self.data.yt[idx])

    def probe_loss_fn(self, model: nn.Module) -> Callable[[], Tensor]:
        xs, ys = self.data.xt[:128], self.data.yt[:128]
        return lambda: self._loss(model(xs), ys)

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        return float(self._loss(model(self.data.xv), self.data.yv))


def make_task(family: str, arch: str, seed: int) -> Any:
    """The task for a (data family, architecture) pair; the seed draws its data."""
    if arch not in ARCHS.get(family, ()):
        raise ValueError(f"no task {family!r} × {arch!r}; known: {ARCHS}")
    if family in ("tabular", "shapes"):
        return ArrayTask(family, arch, seed)
    return SequenceTask(family, arch, seed)


def make_optimizer(arch: str, optimizer: str, lr: float, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (weight decay 0.01) or SGD with momentum 0.9 (weight decay 5e-4) on the trainables."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    raise ValueError(f"unknown optimizer {optimizer!r}")
