"""Meta-train a GRAFF planner offline with evolution strategies (the shipped default planner).

The seed pre-trains its planner "for 300 steps on GSM8K with a tiny Qwen" and warm-starts from it.
Online, the only learning signal is the one-step hypergradient, which is short-sighted
(``docs/concepts/graff.md``). Offline there is time for the signal users care about: the
validation loss *at the end of the budget*. This module optimises the planner's weights
:math:`\\phi` for it with antithetic evolution strategies (Salimans et al., 2017,
https://arxiv.org/abs/1703.03864):

.. math::

    \\nabla_\\phi \\mathbb E_\\tau[F_\\tau(\\phi)] \\approx \\frac{1}{2n\\sigma}\\sum_{k=1}^{n}
      \\bigl(F_{\\tau_k}(\\phi + \\sigma\\epsilon_k) - F_{\\tau_k}(\\phi - \\sigma\\epsilon_k)\\bigr)\\,\\epsilon_k,

where :math:`F_\\tau(\\phi)` is minus the final validation loss of a short GRAFF run on task
:math:`\\tau` (a random seed, model size, base LR and step budget), the two members of a pair share
the task (common random numbers), and Adam takes the step. Tasks: small Qwen3-architecture
character-level language models on GSM8K text (``--data-dir``, default ``../shared/data/gsm8k``).

Reproduce the shipped planner with one command (about 10 minutes on 2 CPU cores)::

    python -m graff.pretrain --out graff/planner/default.safetensors

Requires the ``hf`` extra (transformers).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import graff
from graff.clock import BudgetClock
from graff.planner.net import PlannerNet, save_planner
from graff.schedulers.graff import GraffScheduler


@dataclass(frozen=True)
class Task:
    """One meta-training task: a small char-level Qwen3 LM at a base LR and step budget."""

    seed: int
    hidden: int
    lr: float
    steps: int


class CharCorpus:
    """GSM8K questions and answers as character ids, split into train and validation text."""

    def __init__(self, data_dir: Path, chars: int = 400_000) -> None:
        path = data_dir / "train.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"GSM8K train.jsonl not found in {data_dir}; pass --data-dir.")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        text = "\n\n".join(r["question"] + "\n" + r["answer"] for r in rows)[: chars + 40_000]
        vocab = sorted(set(text))
        self.vocab_size = len(vocab)
        lookup = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([lookup[c] for c in text])
        self.train, self.val = ids[:chars], ids[chars:]

    def batch(
        self, generator: torch.Generator, split: str, size: int = 16, length: int = 64
    ) -> torch.Tensor:
        src = self.train if split == "train" else self.val
        starts = torch.randint(0, len(src) - length - 1, (size,), generator=generator)
        return torch.stack([src[s : s + length] for s in starts.tolist()])


def _model(vocab_size: int, hidden: int, seed: int) -> torch.nn.Module:
    import transformers  # the hf extra

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return transformers.Qwen3ForCausalLM(config)


def run_task(task: Task, corpus: CharCorpus, planner: PlannerNet | None) -> float:
    """Final validation loss of one run; ``planner=None`` runs the budget prior alone."""
    model = _model(corpus.vocab_size, task.hidden, task.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.01)
    clock = BudgetClock(steps=task.steps)
    if planner is None:
        sched = GraffScheduler(
            opt,
            clock,
            guard=False,
            warm_start=None,
            config=graff.GraffConfig(online=False, peak_search=False),
        )
    else:
        sched = GraffScheduler(
            opt, clock, model=model, warm_start=None, config=graff.GraffConfig(planner=True)
        )
        sched.planner.load_state_dict(planner.state_dict())
    g = torch.Generator().manual_seed(task.seed)
    for _ in range(task.steps):
        ids = corpus.batch(g, "train")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step(loss)
        opt.zero_grad(set_to_none=True)
    sched.remove()
    model.eval()
    gv = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        losses = [
            model(input_ids=(b := corpus.batch(gv, "val", 32)), labels=b).loss for _ in range(4)
        ]
    value = float(torch.stack(losses).mean())
    return value if math.isfinite(value) else 10.0


def _flat(planner: PlannerNet) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(planner.parameters()).detach().clone()


def _with(planner: PlannerNet, vector: torch.Tensor) -> PlannerNet:
    out = PlannerNet(planner.num_features, planner.hidden, planner.message_size)
    torch.nn.utils.vector_to_parameters(vector, out.parameters())
    return out


def sample_task(rng: torch.Generator, steps: int) -> Task:
    """A random task: seed, width 32/64, base LR log-uniform in [1e-4, 1e-2], the step budget."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    hidden = (32, 64)[int(torch.randint(0, 2, (1,), generator=rng))]
    lr = 10 ** float(torch.empty(1).uniform_(-4.0, -2.0, generator=rng))
    return Task(seed=seed, hidden=hidden, lr=lr, steps=steps)


def meta_train(
    corpus: CharCorpus,
    *,
    iterations: int,
    pairs: int,
    steps: int,
    sigma: float,
    lr: float,
    seed: int,
) -> tuple[PlannerNet, list[dict[str, float]]]:
    """Antithetic ES on the planner's weights; returns the planner and a per-iteration log."""
    torch.manual_seed(seed)
    planner = PlannerNet()
    phi = _flat(planner)
    phi.requires_grad_(True)
    adam = torch.optim.Adam([phi], lr=lr)
    rng = torch.Generator().manual_seed(seed)
    log = []
    for it in range(iterations):
        grad = torch.zeros_like(phi)
        finals = []
        for _ in range(pairs):
            task = sample_task(rng, steps)
            eps = torch.randn(phi.shape, generator=rng)
            plus = run_task(task, corpus, _with(planner, phi.detach() + sigma * eps))
            minus = run_task(task, corpus, _with(planner, phi.detach() - sigma * eps))
            grad += (plus - minus) / (2 * pairs * sigma) * eps  # gradient of the loss
            finals.append(0.5 * (plus + minus))
        adam.zero_grad()
        phi.grad = grad
        adam.step()
        entry = {
            "iteration": it,
            "mean_val_loss": sum(finals) / len(finals),
            "grad_norm": float(grad.norm()),
        }
        log.append(entry)
        print(json.dumps(entry), flush=True)
    return _with(planner, phi.detach()), log


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("graff/planner/default.safetensors"))
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("GRAFF_GSM8K_DIR", "../shared/data/gsm8k")),
    )
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    corpus = CharCorpus(args.data_dir)
    planner, log = meta_train(
        corpus,
        iterations=args.iterations,
        pairs=args.pairs,
        steps=args.steps,
        sigma=args.sigma,
        lr=args.lr,
        seed=args.seed,
    )
    save_planner(planner, args.out)
    provenance = {
        "command": " ".join(
            [Path(sys.executable).name, "-m", "graff.pretrain", *(argv or sys.argv[1:])]
        ),
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "log": log,
    }
    args.out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
