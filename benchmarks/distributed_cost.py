"""Per-step cost of graff's rank agreement under DDP: ``python -m benchmarks.distributed_cost``.

Spawns 2 gloo processes on CPU, trains a small causal LM under ``DistributedDataParallel`` with a
:class:`graff.GraffScheduler` (``model=``: loss capture, entropy and curvature probes on), and
times, per step and interleaved, the training step (forward, backward with DDP's gradient
all-reduce, ``optimizer.step``), the scheduler step and, inside it, its one all-reduce
(the rank synchroniser's ``exchange_step``; in the loop this includes waiting for the slower rank). Then
times the same exchange alone, both ranks already waiting at a barrier (the latency). Prints
medians over the steps for rank 0, and the payload of the all-reduce in bytes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import graff
from benchmarks.markdown import markdown_table


class _LM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(vocab, dim)
        self.model.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.model.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.model.embed(input_ids)
        for layer in self.model.layers:
            h = h + torch.tanh(layer(h))
        logits = self.lm_head(self.model.norm(h))
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
        )
        return {"loss": loss}


def _worker(rank: int, store: str, config: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = _LM(config["vocab"], config["dim"], config["layers"])
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = config["steps"]
    sched = graff.GraffScheduler(opt, graff.BudgetClock(steps=steps + 10), model=net)
    exchange_times: list[float] = []
    # graff has no public hook on its rank exchange: time the method of the scheduler's own
    # (private) synchroniser object, found through the instance rather than a private import
    sync_cls = type(sched._sync)
    real_exchange = sync_cls.exchange_step

    def timed_exchange(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_exchange(self, *args, **kwargs)
        finally:
            exchange_times.append(time.perf_counter() - t0)

    sync_cls.exchange_step = timed_exchange  # type: ignore[method-assign]
    payload = 8 * (5 + 5 * len(sched._entropy_probes()))
    train_times, sched_times = [], []
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        ids = torch.randint(0, config["vocab"], (config["batch"], config["seq"]), generator=gen)
        dist.barrier()  # the ranks start each step together: time the work, not the skew
        t0 = time.perf_counter()
        net(input_ids=ids)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        sched.step()
        t2 = time.perf_counter()
        train_times.append(t1 - t0)
        sched_times.append(t2 - t1)
    isolated = []  # the same exchange with both ranks already waiting at it: latency, no skew
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        real_exchange(
            sched._sync,
            1.0,
            True,
            0.0,
            [p.sufficient_statistics() for p in sched._entropy_probes()],
        )
        isolated.append(time.perf_counter() - t0)
    if rank == 0:
        skip = 5  # warm-up
        torch.save(
            {
                "payload_bytes": payload,
                "train_ms": 1e3 * statistics.median(train_times[skip:]),
                "scheduler_ms": 1e3 * statistics.median(sched_times[skip:]),
                "exchange_ms": 1e3 * statistics.median(exchange_times[skip:]),
                "isolated_ms": 1e3 * statistics.median(isolated[skip:]),
                "params": sum(p.numel() for p in model.parameters()),
            },
            out,
        )
    dist.destroy_process_group()


CONFIGS = {
    "tiny (test model size)": {"vocab": 16, "dim": 16, "layers": 2, "batch": 4, "seq": 8},
    "small LM": {"vocab": 256, "dim": 256, "layers": 4, "batch": 8, "seq": 128},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    rows = []
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "result.pt")
            cfg = {**config, "steps": args.steps}
            mp.spawn(_worker, args=(str(Path(tmp) / "store"), cfg, out), nprocs=2, join=True)
            r = torch.load(out, weights_only=True)
        rows.append(
            (
                name,
                f"{r['params']:,}",
                f"{r['train_ms']:.2f}",
                f"{r['scheduler_ms']:.3f}",
                f"{r['exchange_ms']:.3f}",
                f"{r['isolated_ms']:.3f}",
                r["payload_bytes"],
            )
        )
    header = (
        "model",
        "params",
        "train step (ms)",
        "scheduler step (ms)",
        "its all-reduce, in the loop (ms)",
        "the all-reduce alone (ms)",
        "bytes",
    )
    print("\n".join(markdown_table(header, rows)))


if __name__ == "__main__":
    main()
