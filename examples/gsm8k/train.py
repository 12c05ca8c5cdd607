"""One GSM8K run: Qwen3-0.6B + LoRA under a wall-clock budget with GRAFF, REACTOR or a baseline.

Usage::

    python examples/gsm8k/train.py --config examples/gsm8k/configs/<run>.yaml \\
        --mode trial|full --results-dir DIR [--data-dir DIR] [--resume] [--seed N] \\
        [--budget-minutes 60] [--session-steps N]

``full`` reproduces the seed's setting (needs a GPU and the Hugging Face hub); ``trial`` runs the
same code on a tiny Qwen3 built from a config with a locally trained tokenizer, a few GSM8K items
and a few steps (about a minute on a CPU). The budget counts everything after the model is
loaded: training, the periodic evaluations and the final evaluation. Training stops early
enough to leave room for the final evaluation, whose EM is the run's "EM at budget": before each
step it checks that the remaining budget still covers that step (the longest step so far, plus
the evaluation and checkpoint it triggers) and the final evaluation (its cost measured on the
last evaluation), the same rule for every method.
Writes ``{results_dir}/{run_id}/metrics.json`` (see the README for the fields) and a checkpoint
``checkpoint.pt`` (LoRA adapters, optimizer, scheduler, clock, data position, history) that
``--resume`` continues from.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout

from data import DEFAULT_DATA_DIR, BatchStream, Example, collate, load_gsm8k
from modeling import build_model
from scoring import exact_match, extract_gold, extract_prediction, generate_answers

from graff.clock import BudgetClock
from graff.priors import BudgetPrior

METHODS = ("graff", "reactor", "fixed", "cosine")
MODES = ("trial", "full")
CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------- config
def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in recursively."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | Path, mode: str) -> dict[str, Any]:
    """Read a run config and apply its ``trial:`` section in trial mode.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: on a bad mode, method or missing section.
    """
    import yaml

    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found (see examples/gsm8k/configs/).")
    cfg = yaml.safe_load(path.read_text()) or {}
    trial = cfg.pop("trial", {}) or {}
    if mode == "trial":
        cfg = deep_merge(cfg, trial)
    for key in ("run_id", "method", "model", "optimizer", "training", "eval"):
        if key not in cfg:
            raise ValueError(f"config {path} lacks the '{key}' section/key.")
    if cfg["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg['method']!r} in {path}.")
    if float(cfg["training"]["budget_minutes"]) <= 0:
        raise ValueError(f"training.budget_minutes must be > 0 in {path}.")
    return cfg


# -------------------------------------------------------------------------- scheduler
def make_scheduler(cfg: dict[str, Any], optimizer: Any, clock: BudgetClock, model: Any) -> Any:
    """GRAFF, REACTOR, or a baseline (fixed LR; warm-up + cosine over the wall-clock budget)."""
    method, kwargs = cfg["method"], dict(cfg.get("scheduler") or {})
    if method == "graff":
        from graff import GraffConfig, GraffScheduler

        warmup = kwargs.pop("warmup", None)  # the prior's warm-up fraction
        if warmup is not None:
            kwargs["prior"] = BudgetPrior(kwargs.get("prior", "wsd"), warmup=float(warmup))
        config = GraffConfig(**(kwargs.pop("config", None) or {}))
        return GraffScheduler(optimizer, clock, model=model, config=config, **kwargs)
    if method == "reactor":
        from graff import ReactorConfig, ReactorScheduler

        kwargs.setdefault("seed", int(cfg.get("seed", 0)))
        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in ReactorConfig.__dataclass_fields__}
        return ReactorScheduler(
            optimizer, clock, model=model, config=ReactorConfig(**knobs), **kwargs
        )
    if method == "fixed":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    prior = BudgetPrior("cosine", warmup=float(kwargs.get("warmup", 0.05)), final=0.0)
    clock.start()
    floor = float(kwargs.get("lr_min_factor", 1e-3))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _step: max(floor, prior(clock.fraction_used))
    )


def scheduler_step(sched: Any, loss: float) -> None:
    """Step any scheduler once per optimizer step (graff's take the loss)."""
    if type(sched).__module__.startswith("graff"):
        sched.step(loss)
    else:
        sched.step()


def own_seconds(sched: Any) -> float | None:
    """The scheduler's own seconds so far where it reports them (``GraffScheduler``: its probe
    hooks inside ``optimizer.step()``, every λ̂ estimate and ``step()``), else None."""
    report = getattr(sched, "overhead_seconds", None)
    return float(sum(report().values())) if callable(report) else None


# ------------------------------------------------------------------------- evaluation
def evaluate_em(model: Any, tokenizer: Any, items: list[Example], ecfg: dict[str, Any]) -> float:
    """Greedy exact-match accuracy (in %) on ``items``."""
    gens = generate_answers(
        model,
        tokenizer,
        [e.question for e in items],
        max_new_tokens=int(ecfg["max_new_tokens"]),
        batch_size=int(ecfg["batch_size"]),
    )
    hits = [
        exact_match(extract_prediction(g), extract_gold(e.answer))
        for g, e in zip(gens, items, strict=True)
    ]
    return 100.0 * sum(hits) / len(hits)


def auc_em_time(history: list[dict[str, float]], budget_seconds: float) -> float:
    """AUC of EM(t)/B: EM held from each evaluation until the next (0 before the first), to B.

    Anytime accuracy: the area under the step curve of the best-known EM at time t, divided by
    the budget, so it lies in [0, 100] like EM.
    """
    area, points = 0.0, sorted((h["time_s"], h["em"]) for h in history)
    for i, (t, em) in enumerate(points):
        end = points[i + 1][0] if i + 1 < len(points) else budget_seconds
        area += em * max(0.0, min(end, budget_seconds) - min(t, budget_seconds))
    return area / budget_seconds


# ------------------------------------------------------------------------- checkpoint
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, then ``os.replace``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA adapter weights (peft's adapter state dict)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


# ------------------------------------------------------------------------------ run
class Run:
    """State and steps of one training run (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any], mode: str, out_dir: Path, data_dir: str | None) -> None:
        self.cfg, self.mode, self.out_dir = cfg, mode, out_dir
        self.tcfg, self.ecfg = cfg["training"], cfg["eval"]
        seed = int(cfg.get("seed", 0))
        if self.tcfg.get("num_threads"):  # a shared CPU: one thread avoids oversubscription
            torch.set_num_threads(int(self.tcfg["num_threads"]))
        torch.manual_seed(seed)
        train, test, self.data_source = load_gsm8k(data_dir)
        dcfg = cfg.get("data") or {}
        if dcfg.get("train_examples"):
            train = train[: int(dcfg["train_examples"])]
        self.test = test
        self.model, self.tokenizer = build_model(cfg, mode, train)
        self.stream = BatchStream(train, int(self.tcfg["micro_batch_size"]), seed)
        ocfg = cfg["optimizer"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=float(ocfg["lr"]),
            betas=tuple(float(b) for b in ocfg["betas"]),
            weight_decay=float(ocfg["weight_decay"]),
        )
        self.budget_seconds = 60.0 * float(self.tcfg["budget_minutes"])
        self.clock = BudgetClock(seconds=self.budget_seconds)
        self.sched = make_scheduler(cfg, self.optimizer, self.clock, self.model)
        self.clock.start()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.lr_trajectory: list[list[float]] = []
        self.losses: list[list[float]] = []
        self.sched_seconds = 0.0
        self.eval_seconds_per_item = float(self.ecfg.get("initial_seconds_per_item", 0.0))
        self.eval_every = int(self.tcfg["eval_every"])
        self.checkpoint_every = int(self.tcfg.get("checkpoint_every", self.eval_every))
        self.max_step_seconds = 0.0  # the longest optimizer step so far (scheduler included)
        self.checkpoint_seconds = 0.0  # the last checkpoint's write time
        self.finished = False

    def eval_items(self, final: bool) -> list[Example]:
        """Fixed subset of the test split: ``intermediate_examples`` or ``final_examples``."""
        n = self.ecfg.get("final_examples" if final else "intermediate_examples")
        return self.test if n is None else self.test[: int(n)]

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        started = time.perf_counter()
        self.model.train()
        accum, total = int(self.tcfg["grad_accum"]), 0.0
        device = next(self.model.parameters()).device
        for _ in range(accum):
            batch = collate(self.tokenizer, self.stream.next(), int(self.tcfg["max_length"]))
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self._autocast()):
                loss = self.model(**batch).loss
            (loss / accum).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]],
            float(self.tcfg.get("max_grad_norm", 1.0)),
        )
        own_before = own_seconds(self.sched)
        self.optimizer.step()  # GRAFF's probe hooks (and λ̂ estimates) run in here
        tic = time.perf_counter()
        scheduler_step(self.sched, total / accum)
        own_after = own_seconds(self.sched)
        if own_before is None or own_after is None:  # a torch scheduler: its step() alone
            self.sched_seconds += time.perf_counter() - tic
        else:
            self.sched_seconds += own_after - own_before
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.max_step_seconds = max(self.max_step_seconds, time.perf_counter() - started)
        return total / accum

    def _autocast(self) -> bool:
        return (
            self.mode == "full"
            and self.cfg["model"].get("dtype") == "bf16"
            and torch.cuda.is_available()
            and torch.cuda.is_bf16_supported()
        )

    def evaluate(self, final: bool) -> dict[str, float]:
        """Evaluate (time counts against the budget) and record the point."""
        items = self.eval_items(final)
        tic = time.perf_counter()
        em = evaluate_em(self.model, self.tokenizer, items, self.ecfg)
        loss = self.eval_loss(items)
        self.eval_seconds_per_item = (time.perf_counter() - tic) / len(items)
        point = {
            "step": self.step,
            "time_s": self.clock.elapsed_seconds,
            "em": em,
            "loss": loss,
            "n": len(items),
            "final": final,
        }
        self.history.append(point)
        return point

    def eval_loss(self, items: list[Example]) -> float:
        """Teacher-forced loss on the gold solutions of ``items`` (meaningful even in trial)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        total, size = 0.0, int(self.ecfg["batch_size"])
        with torch.no_grad():
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                batch = collate(self.tokenizer, chunk, int(self.tcfg["max_length"]))
                batch = {k: v.to(device) for k, v in batch.items()}
                total += float(self.model(**batch).loss) * len(chunk)
        return total / len(items)

    def should_stop(self) -> bool:
        """Step cap reached, or the next step would leave too little budget for the final eval.

        The final evaluation's EM is the run's result "at the budget", so it has to finish inside
        the budget. Its cost is extrapolated from the last evaluation (seconds per item × its
        items, × 1.2); the next step is charged at the longest step so far (periodic scheduler
        work makes steps uneven), plus the evaluation and the checkpoint it triggers. The same
        rule stops every method, so none gets more training time than another.
        """
        if self.step >= int(self.tcfg["max_steps"]):
            return True
        upcoming = self.step + 1
        next_step = self.max_step_seconds
        if upcoming % self.eval_every == 0 and upcoming < int(self.tcfg["max_steps"]):
            next_step += 1.2 * self.eval_seconds_per_item * len(self.eval_items(final=False))
        if upcoming % self.checkpoint_every == 0:
            next_step += self.checkpoint_seconds
        final_eval = 1.2 * self.eval_seconds_per_item * len(self.eval_items(final=True))
        safety = float(self.tcfg.get("safety_seconds", 0.0))
        return self.clock.remaining <= next_step + final_eval + safety

    def save(self, path: Path) -> None:
        """Checkpoint the run (:func:`save_checkpoint`), timing the write for :meth:`should_stop`."""
        tic = time.perf_counter()
        save_checkpoint(path, self.state())
        self.checkpoint_seconds = time.perf_counter() - tic

    # --------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs."""
        return {
            "format_version": 1,
            "run_id": self.cfg["run_id"],
            "step": self.step,
            "adapter": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.sched.state_dict(),
            "clock": self.clock.state_dict(),
            "stream_position": self.stream.position,
            "history": self.history,
            "lr_trajectory": self.lr_trajectory,
            "losses": self.losses,
            "sched_seconds": self.sched_seconds,
            "eval_seconds_per_item": self.eval_seconds_per_item,
            "max_step_seconds": self.max_step_seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            "rng": torch.get_rng_state(),
            "finished": self.finished,
        }

    def load(self, path: Path) -> None:
        """Restore a checkpoint written by :meth:`state`.

        Raises:
            ValueError: if the checkpoint belongs to another run.
        """
        from peft import set_peft_model_state_dict

        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format_version") != 1 or state.get("run_id") != self.cfg["run_id"]:
            raise ValueError(
                f"{path} is not a checkpoint of run {self.cfg['run_id']!r} "
                f"(found run {state.get('run_id')!r}); use another --results-dir or drop --resume."
            )
        set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.clock.load_state_dict(state["clock"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.stream.position = int(state["step"]), int(state["stream_position"])
        self.history, self.lr_trajectory = state["history"], state["lr_trajectory"]
        self.losses, self.sched_seconds = state["losses"], float(state["sched_seconds"])
        self.eval_seconds_per_item = float(state["eval_seconds_per_item"])
        self.max_step_seconds = float(state.get("max_step_seconds", 0.0))
        self.checkpoint_seconds = float(state.get("checkpoint_seconds", 0.0))
        torch.set_rng_state(state["rng"])
        self.finished = bool(state["finished"])


# -------------------------------------------------------------------------- metrics
def build_metrics(run: Run, wall_seconds: float) -> dict[str, Any]:
    """The run's ``metrics.json`` content."""
    final = run.history[-1]
    budget_min = float(run.tcfg["budget_minutes"])
    em_key = f"em_at_{budget_min:g}min"
    sched = run.sched
    energy = run.clock.energy_joules
    return {
        "run_id": run.cfg["run_id"],
        "group": run.cfg.get("group", run.cfg["run_id"]),
        "method": run.cfg["method"],
        "mode": run.mode,
        "seed": int(run.cfg.get("seed", 0)),
        "model": run.cfg["model"]["name"] if run.mode == "full" else "tiny-qwen3-trial",
        "data_source": run.data_source,
        "budget_minutes": budget_min,
        "budget_seconds": run.budget_seconds,
        "primary_metric": em_key,
        "primary_metric_description": f"Exact-match accuracy at {budget_min:g} min wall-clock.",
        em_key: final["em"],
        "em_at_budget": final["em"],
        "final_eval_examples": final["n"],
        "auc_em_time_normalized": auc_em_time(run.history, run.budget_seconds),
        "eval_loss_at_budget": final["loss"],
        "energy_joules": energy,
        "energy_available": energy is not None,
        "steps": run.step,
        "budget_used_seconds": run.clock.elapsed_seconds,
        "final_eval_within_budget": final["time_s"] <= run.budget_seconds,
        "wall_seconds_this_session": wall_seconds,
        "scheduler_seconds": run.sched_seconds,
        "guard_activations": getattr(sched, "guard_activations", None),
        "eval_history": run.history,
        "lr_trajectory": [{"step": s, "time_s": t, "lr": lr} for s, t, lr in run.lr_trajectory],
        "train_loss": [{"step": s, "time_s": t, "loss": v} for s, t, v in run.losses],
        "config": run.cfg,
    }


# ----------------------------------------------------------------------------- main
def _wandb(cfg: dict[str, Any], run_dir: Path) -> Any:
    wcfg = cfg.get("wandb") or {}
    if not wcfg.get("enabled", False):
        return None
    if importlib.util.find_spec("wandb") is None:
        warnings.warn("wandb.enabled is set but wandb is not installed; not logging.", stacklevel=2)
        return None
    import wandb

    return wandb.init(
        project=wcfg.get("project", "graff-gsm8k"),
        name=cfg["run_id"],
        mode=wcfg.get("mode", "offline"),
        dir=str(run_dir),
        config=cfg,
    )


def _progress(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the examples extra
        return None
    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def train_loop(run: Run, ckpt: Path, logger: Any, session_steps: int | None) -> bool:
    """Train until the budget or cap says stop; ``False`` if ``session_steps`` interrupted it."""
    bar, first_step = _progress(int(run.tcfg["max_steps"])), run.step
    if bar is not None:
        bar.update(run.step)
    while not run.should_stop():
        loss = run.train_step()
        now, lr = run.clock.elapsed_seconds, float(run.optimizer.param_groups[0]["lr"])
        run.losses.append([run.step, now, loss])
        run.lr_trajectory.append([run.step, now, lr])
        log = {"loss": loss, "lr": lr}
        if run.step % run.eval_every == 0 and run.step < int(run.tcfg["max_steps"]):
            log["em"] = run.evaluate(final=False)["em"]
        if run.step % run.checkpoint_every == 0:
            run.save(ckpt)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in log.items()})
        if logger is not None:
            logger.log({**log, "time_s": now}, step=run.step)
        if session_steps is not None and run.step - first_step >= session_steps:
            run.save(ckpt)
            return False
    if bar is not None:
        bar.close()
    return True


def run_training(
    cfg: dict[str, Any],
    mode: str,
    results_dir: str | Path,
    data_dir: str | None,
    resume: bool,
    session_steps: int | None = None,
) -> dict[str, Any] | None:
    """Train one run, write ``metrics.json`` and return the metrics.

    Args:
        cfg: The run config (after :func:`config_from_args`).
        mode: ``"trial"`` or ``"full"``.
        results_dir: Parent folder of the run folder.
        data_dir: GSM8K folder, or ``None`` for the Hugging Face dataset.
        resume: Continue from the run folder's checkpoint.
        session_steps: Stop after this many steps in this session, checkpoint and return
            ``None`` without the final evaluation (preemptible jobs; tests of resume).

    Raises:
        FileExistsError: if the run folder already has a checkpoint and ``resume`` is False.
    """
    out_dir = Path(results_dir) / cfg["run_id"]
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / CHECKPOINT
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists; pass --resume to continue it or remove the folder.")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    started = time.perf_counter()
    run = Run(cfg, mode, out_dir, data_dir)
    if resume and ckpt.exists():
        run.load(ckpt)
        if run.finished and (out_dir / "metrics.json").is_file():
            print(f"{cfg['run_id']} already finished; metrics.json kept.")
            return json.loads((out_dir / "metrics.json").read_text())
    logger = _wandb(cfg, out_dir)
    if not train_loop(run, ckpt, logger, session_steps):
        print(f"{cfg['run_id']}: stopped after {session_steps} steps; --resume continues.")
        return None
    run.evaluate(final=True)
    run.finished = True
    save_checkpoint(ckpt, run.state())
    metrics = build_metrics(run, time.perf_counter() - started)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    if logger is not None:
        logger.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.finish()
    return metrics


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (torch.Tensor,)):
        return obj.tolist()
    return str(obj)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--results-dir", required=True)
    p.add_argument("--data-dir", default=None, help="folder with GSM8K train/test.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    p.add_argument("--seed", type=int, default=None, help="override the seed (run id gets -seedN)")
    p.add_argument(
        "--budget-minutes", type=float, default=None, help="e.g. 60 (run id gets -60min)"
    )
    p.add_argument(
        "--session-steps",
        type=int,
        default=None,
        help="checkpoint and exit after N steps (preemptible jobs); --resume continues",
    )
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config with command-line overrides applied (seed and budget change the run id)."""
    cfg = load_config(args.config, args.mode)
    if args.budget_minutes is not None:
        if args.budget_minutes <= 0:
            raise ValueError(f"--budget-minutes must be > 0, got {args.budget_minutes}.")
        cfg["training"]["budget_minutes"] = args.budget_minutes
        cfg["run_id"] += f"-{args.budget_minutes:g}min"
    cfg["group"] = cfg["run_id"]
    if args.seed is not None:
        cfg["seed"] = args.seed
        cfg["run_id"] += f"-seed{args.seed}"
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    data_dir = args.data_dir
    if args.mode == "trial" and data_dir is None:  # trial never touches the hub
        data_dir = os.environ.get("GRAFF_GSM8K_DIR", str(DEFAULT_DATA_DIR))
    if args.session_steps is not None and args.session_steps < 1:
        raise ValueError(f"--session-steps must be >= 1, got {args.session_steps}.")
    metrics = run_training(
        cfg, args.mode, args.results_dir, data_dir, args.resume, args.session_steps
    )
    if metrics is None:
        return 0
    print(
        f"{metrics['run_id']}: EM at budget {metrics['em_at_budget']:.1f}% "
        f"(AUC/B {metrics['auc_em_time_normalized']:.1f}) after {metrics['steps']} steps, "
        f"{metrics['budget_used_seconds']:.0f}s of {metrics['budget_seconds']:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
