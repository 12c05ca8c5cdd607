"""``python -m benchmarks gpu``: GRAFF vs WSD vs cosine vs schedule-free at one wall-clock budget.

One command, under 8 minutes on one datacenter GPU, no network: a Qwen3-architecture model of
~160M parameters built from a ``transformers.Qwen3Config`` (no download), trained from scratch on
GSM8K text (``--data-dir``, ``$GRAFF_GSM8K_DIR`` or ``../shared/data/gsm8k``) tokenised with a
byte-level BPE trained locally on the train split in seconds (``tokenizers``). Every method trains
with AdamW (the user's LR 1e-3, weight decay 0.01, gradient clipping at 1.0), micro-batch 8 × 8
gradient accumulation (64 sequences of 512 tokens per optimizer step, as the seed's GSM8K
configuration) in bf16 autocast where ``torch.cuda.is_bf16_supported()``, until its own
``graff.BudgetClock(seconds=90)`` runs out: GRAFF plans against that clock, WSD and cosine follow
its ``fraction_used``, schedule-free warms up over 5 % of the steps a timed warm-up step predicts.
Then each method's held-out loss (nats/token) is measured on the same fixed windows of the GSM8K
test split (schedule-free in its ``.eval()`` point). Printed and written as compact JSON
(``--out``): loss, steps, tokens/s, GRAFF's overhead share (``GraffScheduler.overhead_seconds()``
/ train time) and peak GPU memory (``torch.cuda.max_memory_allocated``), with the command, git
commit, UTC date and machine (GPU name, torch version).

``--tiny`` is a ~1M-parameter CPU configuration (a few seconds per method) that CI runs
(``tests/test_benchmarks_gpu_tiny.py``) so this script does not rot. Without ``--tiny`` the
command refuses to run on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import graff
from benchmarks.loop import clock_budget, train_loop
from benchmarks.markdown import markdown_table
from benchmarks.schedulers import make
from benchmarks.tasks import REPO, _gsm8k_text, _read_jsonl, gsm8k_dir

METHODS = ("graff", "wsd", "cosine", "schedule_free")


@dataclass(frozen=True)
class GpuConfig:
    """Model, data and budget of one ``gpu`` run."""

    hidden: int = 1024
    layers: int = 12
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 64
    intermediate: int = 3072
    vocab: int = 8192
    seq: int = 512
    micro_batch: int = 8
    accum: int = 8
    seconds: float = 90.0
    val_windows: int = 64
    probe_batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    clip: float = 1.0
    tokenizer_rows: int | None = None  # train rows the BPE is trained on (None: all)
    train_rows: int | None = None  # train rows encoded for training (None: all)


FULL = GpuConfig()
TINY = GpuConfig(
    hidden=128,
    layers=4,
    heads=4,
    kv_heads=2,
    head_dim=32,
    intermediate=384,
    vocab=512,
    seq=64,
    micro_batch=8,
    accum=2,
    seconds=3.0,
    val_windows=8,
    probe_batch=4,
    tokenizer_rows=600,
    train_rows=600,
)


# ----------------------------------------------------------------------------- data
def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE trained on ``texts`` (local, no download): GPT-2-style pre-tokenisation."""
    import tokenizers

    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, show_progress=False)
    return tok


@dataclass
class GsmTokens:
    """Token streams of GSM8K train and fixed held-out windows of the test split."""

    train: Tensor
    val: Tensor  # [val_windows, seq + 1]
    vocab_size: int
    tokenizer_seconds: float


def load_tokens(cfg: GpuConfig, data_dir: str | None) -> GsmTokens:
    root = gsm8k_dir(data_dir)
    train_rows = _read_jsonl(root / "train.jsonl")
    test_rows = _read_jsonl(root / "test.jsonl")
    t0 = time.perf_counter()
    texts = [_gsm8k_text([r]) for r in train_rows]
    tok = train_tokenizer(texts[: cfg.tokenizer_rows], cfg.vocab)
    seconds = time.perf_counter() - t0

    def encode(rows: list[str]) -> Tensor:
        ids = [i for enc in tok.encode_batch(rows) for i in enc.ids]
        return torch.tensor(ids, dtype=torch.long)

    train = encode(texts[: cfg.train_rows])
    test = encode([_gsm8k_text([r]) for r in test_rows])
    if len(test) < cfg.seq + 2 or len(train) < cfg.seq + 2:
        raise ValueError(f"GSM8K text too short for windows of {cfg.seq} tokens")
    starts = torch.linspace(0, len(test) - cfg.seq - 2, cfg.val_windows).long()
    val = torch.stack([test[s : s + cfg.seq + 1] for s in starts.tolist()])
    return GsmTokens(train, val, tok.get_vocab_size(), seconds)


def batch(tokens: Tensor, size: int, seq: int, gen: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(tokens) - seq - 2, (size,), generator=gen)
    return torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])


# ----------------------------------------------------------------------------- model
def build_model(cfg: GpuConfig, vocab_size: int, seed: int, device: torch.device) -> nn.Module:
    """A Qwen3ForCausalLM from a ``Qwen3Config`` (fp32 weights; bf16 autocast in the steps)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq + 1,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return transformers.Qwen3ForCausalLM(config).float().to(device)


def _lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token loss of windows of ``seq + 1`` tokens (``seq`` predictions each)."""
    return model(input_ids=ids, labels=ids).loss


# ----------------------------------------------------------------------------- one method
@dataclass
class Env:
    cfg: GpuConfig
    data: GsmTokens
    device: torch.device
    bf16: bool
    seed: int
    est_steps: int = 100


def _autocast(env: Env) -> Any:
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.bf16)


def _step(env: Env, model: nn.Module, setup: Any, gen: torch.Generator) -> Tensor:
    """One optimizer step: ``accum`` micro-batches, clipping, ``optimizer.step()``."""
    cfg = env.cfg
    setup.train_mode()
    setup.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=env.device)
    for _ in range(cfg.accum):
        ids = batch(env.data.train, cfg.micro_batch, cfg.seq, gen).to(env.device)
        with _autocast(env):
            loss = _lm_loss(model, ids) / cfg.accum
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    setup.optimizer.step()
    return total


@torch.no_grad()
def evaluate(env: Env, model: nn.Module) -> float:
    """Mean next-token loss on the fixed test windows (nats/token)."""
    was = model.training
    model.eval()
    losses = []
    for chunk in env.data.val.split(env.cfg.micro_batch):
        with _autocast(env):
            losses.append(float(_lm_loss(model, chunk.to(env.device))) * len(chunk))
    model.train(was)
    return sum(losses) / len(env.data.val)


def warm_up(env: Env) -> tuple[float, int]:
    """One untimed optimizer step (kernels, allocator); the seconds of the next, and #params."""
    model = build_model(env.cfg, env.data.vocab_size, env.seed, env.device)
    setup = make("fixed", model, env.cfg.lr, 1, seed=env.seed, weight_decay=env.cfg.weight_decay)
    gen = torch.Generator().manual_seed(7)
    _step(env, model, setup, gen)
    _sync(env)
    t0 = time.perf_counter()
    _step(env, model, setup, gen)
    _sync(env)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    del model, setup
    return seconds, params


def _sync(env: Env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize()


def run_method(env: Env, name: str) -> dict[str, Any]:
    """Train ``name`` until its clock runs out, then evaluate; never raises."""
    try:
        return {"method": name, "status": "ok", **_run_method(env, name)}
    except Exception as err:  # one method's failure must not lose the others' results
        return {"method": name, "status": "error", "error": f"{type(err).__name__}: {err}"}


def _run_method(env: Env, name: str) -> dict[str, Any]:
    cfg = env.cfg
    gc.collect()  # the previous method's model, optimizer and scheduler (reference cycles)
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, env.data.vocab_size, env.seed, env.device)
    probe = batch(env.data.train, cfg.probe_batch, cfg.seq, torch.Generator().manual_seed(99))
    probe = probe.to(env.device)
    clock = graff.BudgetClock(seconds=cfg.seconds, measure_energy=False)
    setup = make(
        name,
        model,
        cfg.lr,
        env.est_steps,
        seed=env.seed,
        loss_fn=lambda: _lm_loss(model, probe),  # fp32 probe batch for λ̂ (GRAFF only)
        clock=clock,
        weight_decay=cfg.weight_decay,
    )
    gen = torch.Generator().manual_seed(1000 + env.seed)
    model.train()
    clock.start()
    trace = train_loop(
        lambda: _step(env, model, setup, gen), setup, clock_budget(clock), clock=clock
    )
    train_seconds = clock.elapsed_seconds
    steps, lrs = trace.steps, trace.lrs
    train_losses = trace.losses
    setup.eval_mode()
    val = evaluate(env, model)
    tokens = steps * cfg.accum * cfg.micro_batch * cfg.seq
    result: dict[str, Any] = {
        "val_loss": val if math.isfinite(val) else None,
        "steps": steps,
        "tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else None,
        "final_train_loss": _ema(train_losses),
        "peak_memory_bytes": (
            torch.cuda.max_memory_allocated() if env.device.type == "cuda" else None
        ),
        "train_curve": _thin(train_losses),
        "lr_curve": _thin(lrs),
    }
    if isinstance(setup.scheduler, graff.GraffScheduler):
        spent = setup.scheduler.overhead_seconds()
        result["graff_overhead_seconds"] = spent
        result["graff_overhead_share"] = sum(spent.values()) / train_seconds
    return result


def _ema(values: list[float], beta: float = 0.9) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    acc = finite[0]
    for v in finite[1:]:
        acc = beta * acc + (1 - beta) * v
    return acc


def _thin(values: list[float], points: int = 100) -> list[list[float | None]]:
    stride = max(1, -(-len(values) // points))
    return [
        [i, float(f"{v:.6g}") if math.isfinite(v) else None]
        for i, v in enumerate(values)
        if i % stride == 0 or i == len(values) - 1
    ]


# ----------------------------------------------------------------------------- command
def machine(device: torch.device, bf16: bool) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "bf16": bf16,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def markdown(payload: dict[str, Any]) -> str:
    meta = payload["meta"]
    lines = [
        "# graff benchmark — `gpu` (one wall-clock budget per method)",
        "",
        f"`{meta['command']}` at commit `{meta['git_commit'][:12]}`"
        f"{' (dirty)' if meta.get('git_dirty') else ''}, {meta['date']}, "
        f"{meta['machine'].get('gpu', meta['machine']['device'])}, torch {meta['machine']['torch']}; "
        f"{meta['parameters'] / 1e6:.1f}M parameters, {meta['config']['seconds']:g} s per method.",
        "",
    ]
    planned = meta.get("methods_planned", [])
    done = [r["method"] for r in payload["runs"]]
    if len(done) < len(planned):
        missing = ", ".join(m for m in planned if m not in done)
        lines += [
            f"**Partial:** {len(done)} of {len(planned)} methods so far (not run: {missing}).",
            "",
        ]
    rows = []
    for r in payload["runs"]:
        if r["status"] != "ok":
            rows.append((r["method"], f"error: {r['error'][:80]}", "", "", "", ""))
            continue
        share = r.get("graff_overhead_share")
        mem = r["peak_memory_bytes"]
        rows.append(
            (
                r["method"],
                _num(r["val_loss"], ".4f"),
                r["steps"],
                _num(r["tokens_per_second"], ",.0f"),
                "—" if share is None else f"{100 * share:.2f} %",
                "—" if mem is None else f"{mem / 2**30:.2f} GiB",
            )
        )
    header = (
        "method",
        "held-out loss (nats/token)",
        "steps",
        "tokens/s",
        "GRAFF overhead",
        "peak memory",
    )
    lines += markdown_table(header, rows)
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method of ``args.methods`` and write ``results.json`` / ``results.md``."""
    from benchmarks.meta import provenance
    from benchmarks.report import dumps_compact, sanitize

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit(
            "python -m benchmarks gpu needs a CUDA GPU and none was found; "
            "use --tiny for the ~1M-parameter CPU smoke configuration."
        )
    cfg = TINY if args.tiny else FULL
    if args.seconds is not None:
        cfg = replace(cfg, seconds=float(args.seconds))
    device = torch.device("cuda" if cuda and not args.tiny else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    start = time.perf_counter()
    data = load_tokens(cfg, args.data_dir)
    env = Env(cfg, data, device, bf16, args.seed)
    step_seconds, params = warm_up(env)
    env.est_steps = max(1, int(cfg.seconds / step_seconds))
    out = Path(args.out or REPO / "benchmarks" / "results" / ("gpu_tiny" if args.tiny else "gpu"))
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    meta = {
        **{k: prov[k] for k in ("command", "git_commit", "git_dirty", "date")},
        "machine": machine(device, bf16),
        "tiny": bool(args.tiny),
        "seed": args.seed,
        "config": asdict(cfg),
        "parameters": params,
        "vocab_size": data.vocab_size,
        "tokenizer": "byte-level BPE trained on the GSM8K train split (tokenizers)",
        "tokenizer_seconds": data.tokenizer_seconds,
        "warm_up_step_seconds": step_seconds,
        "estimated_steps": env.est_steps,
    }
    runs: list[dict[str, Any]] = []
    for name in methods:
        result = run_method(env, name)
        runs.append(result)
        print(_line(result), flush=True)
        # written after every method: a run cut short (a lent machine's time limit) keeps the
        # methods it finished
        payload = sanitize({"meta": meta, "runs": runs})
        payload["meta"]["wall_seconds"] = time.perf_counter() - start
        payload["meta"]["methods_planned"] = list(methods)
        (out / "results.json").write_text(dumps_compact(payload))
        (out / "results.md").write_text(markdown(payload))
    print(f"wrote {out}/results.json and results.md ({payload['meta']['wall_seconds']:.0f} s)")
    return payload


def _line(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['method']:>14}: {r['status']} {r.get('error', '')}"
    share = r.get("graff_overhead_share")
    mem = r["peak_memory_bytes"]
    return (
        f"{r['method']:>14}: held-out loss {_num(r['val_loss'], '.4f')}, {r['steps']} steps, "
        f"{_num(r['tokens_per_second'], ',.0f')} tokens/s"
        + ("" if share is None else f", GRAFF overhead {100 * share:.2f} %")
        + ("" if mem is None else f", peak memory {mem / 2**30:.2f} GiB")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="results folder (default benchmarks/results/gpu/)")
    parser.add_argument("--tiny", action="store_true", help="~1M-parameter CPU smoke config")
    parser.add_argument("--seconds", type=float, help="wall-clock budget per method (default 90)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", help="GSM8K folder (default $GRAFF_GSM8K_DIR or ../shared/data/gsm8k)"
    )
