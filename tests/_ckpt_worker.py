"""A tiny, deterministic training run that checkpoints itself: the subject of the SIGKILL tests.

``tests/test_checkpoint.py`` runs it as a fork server (``python tests/_ckpt_worker.py``, see
:func:`serve`) and also imports it to build the same run in-process.

:func:`train`: a two-layer causal "LM" in pure torch (embedding, one MLP block, final norm, LM head,
laid out as ``model.layers`` / ``model.norm`` / ``lm_head`` so graff's entropy probe finds it)
returns ``{"loss", "logits"}`` like a Hugging Face model, so a scheduler built with ``model=``
runs its curvature (HVP) and entropy probes. It trains until ``sched.budget.exhausted`` (a step
budget), appends ``step lr`` to a log after every step, saves a checkpoint every ``--every``
steps with :func:`graff.save_checkpoint`, prints ``step N`` on stdout, and resumes from the
checkpoint if one exists. Batches come from a ``torch.Generator`` whose state is saved in the
checkpoint's ``extra``, so a resumed run sees the batches the uninterrupted run saw.

:func:`write_loop` writes ever new checkpoints to one file as fast as it can and reports each
completed write: the subject of the atomic-write fault test.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

import graff

VOCAB, HIDDEN, SEQ, BATCH = 16, 12, 8, 4


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(
            [nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.Tanh(), nn.Linear(2 * HIDDEN, HIDDEN))]
        )
        self.norm = nn.LayerNorm(HIDDEN)


class TinyLM(nn.Module):
    """Next-token prediction with a one-block MLP trunk; forward returns ``{"loss", "logits"}``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded init, the caller's RNG untouched
            torch.manual_seed(seed)
            self.model = _Trunk()
            self.lm_head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.model.embed(input_ids)
        for layer in self.model.layers:
            h = h + layer(h)
        logits = self.lm_head(self.model.norm(h))
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
        )
        return {"loss": loss, "logits": logits}


def batch(generator: torch.Generator) -> torch.Tensor:
    """Sequences counting up from a random start (mod VOCAB): learnable, so the loss falls."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
    return (start + torch.arange(SEQ)) % VOCAB


def build(
    kind: str, steps: int
) -> tuple[TinyLM, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Model, AdamW and a scheduler of ``kind`` with a step budget, probes on (``model=``)."""
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    budget = graff.BudgetClock(steps=steps)
    if kind == "graff":
        sched = graff.GraffScheduler(
            opt, budget=budget, model=model, config=graff.GraffConfig(curvature_every=4)
        )
    elif kind == "reactor":
        sched = graff.ReactorScheduler(
            opt, budget=budget, model=model, seed=0, config=graff.ReactorConfig(decision_interval=3)
        )
    else:
        sched = graff.BudgetScheduler(opt, budget=budget, prior="cosine", model=model)
    return model, opt, sched


def train(kind: str, steps: int, every: int, ckpt: Path, log: Path, step_sleep: float = 0.0):
    """Train to the end of the budget, resuming from ``ckpt`` if it exists. Returns the model."""
    model, opt, sched = build(kind, steps)
    data = torch.Generator().manual_seed(1234)
    step = 0
    if ckpt.exists():
        extra = graff.load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
        step = extra["step"]
        data.set_state(extra["data_rng"])
    with log.open("a") as out:
        while not sched.budget.exhausted:
            ids = batch(data)
            model(input_ids=ids, labels=ids)["loss"].backward()
            opt.step()
            sched.step()  # the loss is captured from the model's forward
            opt.zero_grad(set_to_none=True)
            step += 1
            out.write(f"{step} {sched.get_last_lr()[0]!r}\n")
            out.flush()
            if step % every == 0:
                graff.save_checkpoint(
                    ckpt,
                    model=model,
                    optimizer=opt,
                    scheduler=sched,
                    extra={"step": step, "data_rng": data.get_state()},
                )
            say(f"step {step}")
            time.sleep(step_sleep)
    return model, sched


def say(line: str) -> None:
    """One protocol line on stdout in one ``write`` system call: a pipe write of at most
    ``PIPE_BUF`` bytes is atomic, so a SIGKILL never leaves half a line. (``print`` under
    ``PYTHONUNBUFFERED=1``, as in CI, writes the text and the newline in two calls, and a child
    killed between them glued its partial line to the server's ``exit`` line.)"""
    os.write(1, (line + "\n").encode())


def write_loop(path: Path, numel: int, start: int) -> None:
    """Save checkpoints ``i = start + 1, ...`` whose tensor is filled with ``i``, back to back;
    print ``wrote i`` once each is complete."""
    weights = torch.empty(numel)
    i, parent = start, os.getppid()
    while os.getppid() == parent:  # stop if the fork server is gone: never an orphan writer
        i += 1
        weights.fill_(float(i))
        graff.save_checkpoint(path, extra={"i": i, "weights": weights})
        say(f"wrote {i}")


def run(job: dict) -> None:
    """One job of :func:`serve`: ``{"job": "train", ...}`` or ``{"job": "write", ...}``."""
    if job["job"] == "write":
        write_loop(Path(job["path"]), job["numel"], job["start"])
        return
    model, sched = train(
        job["kind"],
        job["steps"],
        job["every"],
        Path(job["ckpt"]),
        Path(job["log"]),
        job.get("step_sleep", 0.0),
    )
    torch.save(model.state_dict(), job["final"])
    say(f"done {sched.budget.steps}")


def serve() -> None:
    """Fork server: each JSON line on stdin runs one job in a fresh child process.

    Printed on stdout: ``pid P`` when the child starts, the child's own lines, then
    ``exit C`` (the child's exit code, ``-9`` after SIGKILL). Forking from a process that has
    imported torch (and ``torch.optim``, which imports ``torch._dynamo``: seconds of CPU) makes a
    run cost milliseconds instead of a new interpreter. The server holds no training state, so a
    child resuming a run knows only what the checkpoint file tells it.
    """
    torch.set_num_threads(1)  # before any parallel region: forked children stay fork-safe
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # import torch._dynamo now
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(job)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"\nexit {os.waitstatus_to_exitcode(status)}")  # a line of its own, always


if __name__ == "__main__":
    serve()
