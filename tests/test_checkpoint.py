"""graff.save_checkpoint / load_checkpoint: round trips, hostile files, atomic writes, SIGKILL.

The run under test is ``tests/_ckpt_worker.py``: a tiny pure-torch causal LM whose forward
returns ``{"loss", "logits"}``, so schedulers built with ``model=`` run their probes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graff
from graff.checkpoint import _timeless, read_checkpoint
from graff.checkpoint._checksum import payload_digest
from graff.errors import CheckpointError, GraffTypeError
from tests import _ckpt_worker as worker

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(worker.__file__)
KINDS = ["graff", "reactor", "budget"]
STEPS = 20


# ------------------------------------------------------------------- helpers
def _steps(model, opt, sched, data: torch.Generator, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        ids = worker.batch(data)
        model(input_ids=ids, labels=ids)["loss"].backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lrs.append(sched.get_last_lr()[0])
    return lrs


def _fingerprint(model, opt, sched) -> tuple[str, str, str, list[float]]:
    """Digests of everything load_checkpoint may change (clock readings aside)."""
    return (
        payload_digest(model.state_dict()),
        payload_digest(opt.state_dict()),
        payload_digest(_timeless(sched.state_dict())),
        [float(g["lr"]) for g in opt.param_groups],
    )


def _trained(kind: str, steps: int = 7, seed: int = 5):
    model, opt, sched = worker.build(kind, STEPS)
    data = torch.Generator().manual_seed(seed)
    _steps(model, opt, sched, data, steps)
    return model, opt, sched, data


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a checkpoint with ``change(payload)`` applied and a *valid* checksum recomputed."""
    payload = torch.load(src, weights_only=True)
    del payload["checksum"]
    change(payload)
    payload["checksum"] = payload_digest(payload)
    torch.save(payload, dst)
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A GraffScheduler checkpoint after 7 steps (model, optimizer, scheduler, extra)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, opt, sched, data = _trained("graff")
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    graff.save_checkpoint(
        path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        extra={"step": 7, "data": data.get_state()},
    )
    torch.set_num_threads(n)
    return path


@pytest.fixture
def victim(one_torch_thread):
    """A fresh run of the same configuration, a few steps in (its state differs from ``saved``)."""
    model, opt, sched, _ = _trained("graff", steps=3, seed=9)
    return model, opt, sched


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_restores_everything_and_the_next_lrs(kind, tmp_path, one_torch_thread) -> None:
    model, opt, sched, data = _trained(kind)
    path = graff.save_checkpoint(
        tmp_path / "c.pt",
        model=model,
        optimizer=opt,
        scheduler=sched,
        extra={"step": 7, "data": data.get_state()},
    )
    model2, opt2, sched2, _ = _trained(kind, steps=2, seed=99)  # a different state to overwrite
    extra = graff.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert extra["step"] == 7
    assert _fingerprint(model2, opt2, sched2) == _fingerprint(model, opt, sched)
    data2 = torch.Generator()
    data2.set_state(extra["data"])
    assert _steps(model2, opt2, sched2, data2, STEPS - 7) == _steps(
        model, opt, sched, data, STEPS - 7
    )
    assert sched2.budget.exhausted
    assert sched2.budget.steps == STEPS
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "Adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "Adadelta": lambda ps: torch.optim.Adadelta(ps),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-3),
    "ASGD": lambda ps: torch.optim.ASGD(ps, lr=1e-2),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-3),
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-3),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, centered=True, momentum=0.5),
    "Rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-3),
    "Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_torch_optimizer_state_round_trips(name, tmp_path, one_torch_thread) -> None:
    """The optimizer-state shape checks accept every built-in optimizer's real state."""
    if name == "Adafactor" and not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    model = worker.TinyLM()
    opt = OPTIMIZERS[name](model.parameters())
    sched = graff.BudgetScheduler(opt, budget=graff.BudgetClock(steps=10), model=model)
    _steps(model, opt, sched, torch.Generator().manual_seed(0), 2)
    path = graff.save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, scheduler=sched)
    model2 = worker.TinyLM(seed=3)
    opt2 = OPTIMIZERS[name](model2.parameters())
    sched2 = graff.BudgetScheduler(opt2, budget=graff.BudgetClock(steps=10), model=model2)
    graff.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert _fingerprint(model2, opt2, sched2) == _fingerprint(model, opt, sched)


def test_schedule_free_optimizer_round_trips(tmp_path, one_torch_thread) -> None:
    schedulefree = pytest.importorskip("schedulefree")
    model = worker.TinyLM()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3)
    opt.train()
    sched = graff.GraffScheduler(
        opt, budget=graff.BudgetClock(steps=10), model=model, config=graff.GraffConfig(guard_c=2.0)
    )
    _steps(model, opt, sched, torch.Generator().manual_seed(0), 3)
    path = graff.save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, scheduler=sched)
    model2 = worker.TinyLM(seed=3)
    opt2 = schedulefree.AdamWScheduleFree(model2.parameters(), lr=1e-3)
    opt2.train()
    sched2 = graff.GraffScheduler(
        opt2,
        budget=graff.BudgetClock(steps=10),
        model=model2,
        config=graff.GraffConfig(guard_c=2.0),
    )
    graff.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert _fingerprint(model2, opt2, sched2) == _fingerprint(model, opt, sched)


def test_file_is_a_plain_torch_file_with_the_state_dicts(saved) -> None:
    raw = torch.load(saved, weights_only=True)
    assert raw["format"] == "graff.checkpoint"
    assert raw["format_version"] == 1
    assert raw["types"] == {"model": "TinyLM", "optimizer": "AdamW", "scheduler": "GraffScheduler"}
    assert raw["scheduler"]["budget"]["steps"] == 7
    assert raw["checksum"].startswith("sha256:")


def test_torch_lr_scheduler_and_partial_loads(tmp_path, one_torch_thread) -> None:
    model = worker.TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    data = torch.Generator().manual_seed(0)
    _steps(model, opt, sched, data, 3)
    path = graff.save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, scheduler=sched)
    opt2 = torch.optim.SGD(worker.TinyLM(seed=1).parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    assert graff.load_checkpoint(path, optimizer=opt2, scheduler=sched2) is None
    assert sched2.last_epoch == 3
    assert sched2.get_last_lr() == sched.get_last_lr()
    only_model = graff.save_checkpoint(tmp_path / "m.pt", model=model)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        graff.load_checkpoint(only_model, optimizer=opt2)


def test_strict_false_allows_extra_and_missing_keys(tmp_path) -> None:
    small = torch.nn.Sequential(torch.nn.Linear(3, 2))
    path = graff.save_checkpoint(tmp_path / "c.pt", model=small)
    big = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="missing keys"):
        graff.load_checkpoint(path, model=big)
    graff.load_checkpoint(path, model=big, strict=False)
    assert torch.equal(big[0].weight, small[0].weight)


# ------------------------------------------------------------- hostile files
def _assert_refused(path: Path, victim, match: str) -> None:
    before = _fingerprint(*victim)
    with pytest.raises(CheckpointError, match=match):
        graff.load_checkpoint(path, model=victim[0], optimizer=victim[1], scheduler=victim[2])
    assert _fingerprint(*victim) == before  # nothing half-loaded


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_files_are_refused_and_change_nothing(saved, victim, tmp_path, fraction) -> None:
    data = saved.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(fraction * len(data))])
    _assert_refused(cut, victim, "not a readable checkpoint|corrupt|not a graff checkpoint")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3
    )
)
def test_flipped_bytes_are_refused_or_harmless(saved, victim, tmp_path, flips) -> None:
    """A flip is refused, leaving everything untouched, or it hit a byte that means nothing
    (zip padding, an unused header field): then the loaded run equals the saved one exactly."""
    data = bytearray(saved.read_bytes())
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    before = _fingerprint(*victim)
    try:
        graff.load_checkpoint(bad, model=victim[0], optimizer=victim[1], scheduler=victim[2])
    except CheckpointError:
        assert _fingerprint(*victim) == before
        return
    reference = _trained("graff", steps=0)[:3]
    graff.load_checkpoint(saved, model=reference[0], optimizer=reference[1], scheduler=reference[2])
    assert _fingerprint(*victim) == _fingerprint(*reference)


def test_flip_in_tensor_data_is_caught_by_the_checksum(saved, victim, tmp_path) -> None:
    """torch.load alone accepts it (no CRC check) and returns other numbers; graff refuses."""
    raw = torch.load(saved, weights_only=True)
    data = bytearray(saved.read_bytes())
    weight = raw["model"]["lm_head.weight"]
    needle = weight.numpy().tobytes()[:16]
    at = bytes(data).index(needle)
    data[at + 3] ^= 0x40
    bad = tmp_path / "bitrot.pt"
    bad.write_bytes(bytes(data))
    silently = torch.load(bad, weights_only=True)["model"]["lm_head.weight"]
    assert not torch.equal(silently, weight)  # what plain torch.load would hand over
    _assert_refused(bad, victim, "corrupt: its content does not match its checksum")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a readable checkpoint"),
        (b"hello, not a checkpoint\n", "not a readable checkpoint"),
        (None, "does not exist"),
    ],
)
def test_not_a_checkpoint(tmp_path, victim, content, match) -> None:
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    _assert_refused(path, victim, match)
    _assert_refused(tmp_path, victim, "does not exist")  # a directory


def test_other_torch_files_are_not_checkpoints(tmp_path, victim) -> None:
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    _assert_refused(tmp_path / "tensor.pt", victim, "not a graff checkpoint")
    model, opt, _ = victim
    recipe = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save(recipe, tmp_path / "recipe.pt")  # the hand-written recipe: no format entry
    _assert_refused(tmp_path / "recipe.pt", victim, "not a graff checkpoint")


def test_other_format_version_is_refused(saved, victim, tmp_path) -> None:
    path = _rewrite(saved, tmp_path / "v2.pt", lambda p: p.update(format_version=2))
    _assert_refused(path, victim, "format version 2; this graff .* reads version 1")


def test_checksum_is_required_to_match(saved, victim, tmp_path) -> None:
    payload = torch.load(saved, weights_only=True)
    payload["extra"]["step"] = 8  # edited without updating the checksum
    torch.save(payload, tmp_path / "edited.pt")
    _assert_refused(tmp_path / "edited.pt", victim, "does not match its checksum")


def test_other_scheduler_type_is_refused(saved, one_torch_thread) -> None:
    model, opt, sched, _ = _trained("reactor", steps=2)
    _assert_refused(
        saved, (model, opt, sched), "GraffScheduler, cannot load it into a ReactorScheduler"
    )


def test_other_number_of_param_groups_is_refused(saved, one_torch_thread) -> None:
    model = worker.TinyLM()
    opt = torch.optim.AdamW(
        [{"params": model.model.parameters()}, {"params": model.lm_head.parameters()}], lr=3e-3
    )
    sched = graff.GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=STEPS),
        model=model,
        config=graff.GraffConfig(curvature_every=4),
    )
    _assert_refused(saved, (model, opt, sched), r"1 parameter group\(s\), this AdamW has 2")


def test_other_optimizer_type_is_refused(saved, one_torch_thread) -> None:
    model = worker.TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=3e-3)
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=STEPS), model=model)
    _assert_refused(saved, (model, opt, sched), "state of a AdamW, cannot load it into a SGD")


def test_model_with_other_shapes_is_refused(saved, one_torch_thread) -> None:
    model = worker.TinyLM()
    model.lm_head = torch.nn.Linear(worker.HIDDEN, worker.VOCAB + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=STEPS), model=model)
    _assert_refused(
        saved, (model, opt, sched), r"lm_head.weight: shape \(16, 12\) in the checkpoint"
    )


def test_model_with_other_keys_is_refused(saved, victim) -> None:
    victim[0].extra_head = torch.nn.Linear(2, 2)
    _assert_refused(saved, victim, r"missing keys \[extra_head.weight, extra_head.bias\]")


def test_optimizer_over_reordered_parameters_is_refused(saved, one_torch_thread) -> None:
    """Same count of parameters, another order: Adam's moments would land on the wrong tensors."""
    model = worker.TinyLM()
    opt = torch.optim.AdamW(list(model.parameters())[::-1], lr=3e-3)
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=STEPS), model=model)
    _assert_refused(saved, (model, opt, sched), "not the ones .or not in the order")


def test_scheduler_refusing_midway_is_rolled_back(saved, victim, tmp_path) -> None:
    """A scheduler state whose planner loads but whose planner optimizer does not: the scheduler
    changes part of itself before it fails; graff restores it and the optimizer."""

    def break_planner_optimizer(payload) -> None:
        payload["scheduler"]["extra"]["planner"]["optimizer"] = {"state": {}, "param_groups": []}

    path = _rewrite(saved, tmp_path / "midway.pt", break_planner_optimizer)
    _assert_refused(path, victim, "does not fit|parameter groups")


class _RunsCode:
    """Unpickling this calls exec(): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_malicious_pickle_is_not_executed(tmp_path, victim, container) -> None:
    marker = tmp_path / "pwned"
    evil = {
        "format": "graff.checkpoint",
        "format_version": 1,
        "checksum": "sha256:0",
        "types": {},
        "model": None,
        "optimizer": None,
        "scheduler": None,
        "extra": _RunsCode(marker),
    }
    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    _assert_refused(path, victim, "would run code")
    assert not marker.exists()
    if container == "torch.save":  # the control: the payload is live with weights_only=False
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_save_refuses_state_that_would_need_code_to_load(tmp_path) -> None:
    path = tmp_path / "c.pt"
    with pytest.raises(GraffTypeError, match=r"payload\['extra'\]\['bad'\] is a .*_RunsCode"):
        graff.save_checkpoint(path, extra={"bad": _RunsCode(tmp_path / "m")})
    np = pytest.importorskip("numpy")
    with pytest.raises(GraffTypeError, match=r"numpy\.ndarray.*torch\.from_numpy"):
        graff.save_checkpoint(path, extra=[np.zeros(3)])
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_checks_argument_types(tmp_path) -> None:
    with pytest.raises(GraffTypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        graff.save_checkpoint(tmp_path / "c.pt", optimizer="adam")
    with pytest.raises(GraffTypeError, match=r"model must be a torch\.nn\.Module"):
        graff.save_checkpoint(tmp_path / "c.pt", model={})


# ------------------------------------------------------------------ atomicity
def _small_checkpoint(path: Path, value: float) -> None:
    graff.save_checkpoint(path, extra={"value": value, "t": torch.full((1000,), value)})


def test_write_fsyncs_file_then_renames_then_fsyncs_directory(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell a directory fd from a file fd")
    _small_checkpoint(tmp_path / "c.pt", 1.0)
    assert events == ["fsync-file", "replace", "fsync-dir"]


@pytest.mark.parametrize("fail_in", ["torch.save", "fsync", "os.replace"])
def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, fail_in) -> None:
    path = tmp_path / "c.pt"
    _small_checkpoint(path, 1.0)
    real_save = torch.save

    def crash(*args, **kwargs):
        if fail_in == "torch.save":  # write part of the file, then die (disk full, ...)
            buf = io.BytesIO()
            real_save(args[0], buf)
            args[1].write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(f"injected failure in {fail_in}")

    target = {"torch.save": (torch, "save"), "fsync": (os, "fsync"), "os.replace": (os, "replace")}
    monkeypatch.setattr(*target[fail_in], crash)
    with pytest.raises(OSError, match="injected failure"):
        _small_checkpoint(path, 2.0)
    monkeypatch.undo()
    assert read_checkpoint(path)["extra"]["value"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


# ------------------------------------------------------- real processes, SIGKILL
class _Child:
    """A child of the fork server, pinned by a pidfd where available so that a late kill can
    never hit another process that reused the pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: fall back to the pid
            self.fd = None

    def kill(self) -> None:
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass  # already gone

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Server:
    """The fork server of ``tests/_ckpt_worker.py`` (a fresh ``sys.executable`` interpreter)."""

    WATCHDOG_S = 120

    def __init__(self, log: Path) -> None:
        self.log = log
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self._stderr = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def _ensure_alive(self) -> None:
        """A server that died in an earlier test is replaced, so one failure stays one failure
        instead of failing every later test of the module."""
        if self.proc.poll() is None:
            return
        self._stderr.close()
        self.restarts += 1
        self._start()

    def run(
        self, job: dict, *, kill_after_step: int | None = None, kill_after_s: float | None = None
    ):
        """Run ``job`` in a new child; SIGKILL it once it reports step ``kill_after_step`` or
        after ``kill_after_s`` seconds. Returns (exit code, the child's stdout lines)."""
        self._ensure_alive()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        child: list[_Child] = []
        fired: list[str] = []

        def watchdog_kill() -> None:  # never hang the suite, never leave a writer behind
            fired.append("child" if child else "server")
            for c in child:
                c.kill()
            self.proc.kill()  # ends the read below; the next job starts a new server

        watchdog = threading.Timer(self.WATCHDOG_S, watchdog_kill)
        watchdog.start()
        lines, timer = [], None
        try:
            for raw in self.proc.stdout:
                line = raw.strip()
                if not line:
                    continue  # the blank line the server writes before each exit line
                if line.startswith("pid "):
                    child.append(_Child(int(line.split()[1])))
                    if kill_after_s is not None:
                        timer = threading.Timer(kill_after_s, child[0].kill)
                        timer.start()
                elif line.startswith("exit "):
                    return int(line.split()[1]), lines
                else:
                    lines.append(line)
                    step = int(line.split()[1]) if line.startswith("step ") else -1
                    if kill_after_step is not None and child and step == kill_after_step:
                        child[0].kill()
        finally:
            watchdog.cancel()
            if timer is not None:
                timer.join()
            for c in child:
                c.close()
        code = self.proc.wait(timeout=10)
        why = f"killed by the {self.WATCHDOG_S} s watchdog" if fired else f"exit code {code}"
        raise AssertionError(
            f"fork server died ({why}); its last lines: {lines[-5:]}; "
            f"its stderr: {self.log.read_text()!r}"
        )

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:  # the server is already gone
            pass
        self.proc.wait(timeout=60)
        self._stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork and SIGKILL (POSIX)")
    srv = Server(tmp_path_factory.mktemp("server") / "stderr.log")
    yield srv
    srv.close()


def test_sigkill_while_writing_leaves_the_old_or_the_new_checkpoint(server, tmp_path) -> None:
    """A process writes 4 MB checkpoints back to back and is SIGKILLed after a random delay,
    again and again. Each time the file loads, holds the last write the process reported
    complete or the one after it, and its tensor matches its counter (never a mix)."""
    path, rng = tmp_path / "ckpt.pt", random.Random(0)
    last, mid_write, kills = 0, 0, 0
    while kills < 20 and (kills < 6 or mid_write < 2):  # ~40 % of kills land mid-write
        job = {"job": "write", "path": str(path), "numel": 1 << 20, "start": last}
        code, lines = server.run(job, kill_after_s=rng.uniform(0.05, 0.4))
        kills += 1
        assert code == -signal.SIGKILL, lines
        leftovers = list(tmp_path.glob(".ckpt.pt.*.tmp"))
        mid_write += bool(leftovers)  # killed between creating the temporary file and the rename
        for p in leftovers:
            p.unlink()
        reported = [int(x.split()[1]) for x in lines if x.startswith("wrote ")]
        if not path.exists():
            assert reported == []  # killed before the first write completed
            continue
        payload = read_checkpoint(path)  # never raises: the old or the new file, whole
        done = reported[-1] if reported else last
        i = payload["extra"]["i"]
        assert i in (done, done + 1)
        assert torch.equal(payload["extra"]["weights"], torch.full((1 << 20,), float(i)))
        last = i
    assert mid_write >= 1, "no kill landed during a write: the test proved nothing"
    assert last > 0  # the writers made progress


def test_a_dead_fork_server_is_replaced_before_the_next_job(server, tmp_path) -> None:
    """The harness itself: a server killed under one test must not fail every later one."""
    server.proc.kill()
    server.proc.wait(timeout=10)
    restarts = server.restarts
    job = {"job": "write", "path": str(tmp_path / "c.pt"), "numel": 16, "start": 0}
    code, lines = server.run(job, kill_after_s=1.0)  # a 64-byte write takes milliseconds
    assert server.restarts == restarts + 1
    assert code == -signal.SIGKILL, lines
    assert lines[0] == "wrote 1", lines


# ----------------------------------------------------------- SIGKILL + resume
STEPS_RESUME, EVERY, KILL_AFTER = 40, 5, 17


def _train_job(kind: str, tmp: Path) -> dict:
    return {
        "job": "train",
        "kind": kind,
        "steps": STEPS_RESUME,
        "every": EVERY,
        "ckpt": str(tmp / "ckpt.pt"),
        "log": str(tmp / "lr.log"),
        "final": str(tmp / "final.pt"),
        "step_sleep": 0.02,
    }


@pytest.mark.parametrize("kind", ["graff", "reactor"])
def test_sigkilled_run_resumes_to_the_uninterrupted_trajectory(
    server, kind, tmp_path, one_torch_thread
) -> None:
    """A run (probes on, step budget 40, checkpoint every 5 steps) is SIGKILLed once it reports
    step 17, resumed from its last checkpoint in a new process, and ends within the budget with
    the LRs and parameters of an uninterrupted run."""
    code, lines = server.run(_train_job(kind, tmp_path), kill_after_step=KILL_AFTER)
    assert code == -signal.SIGKILL, lines
    assert not any(x.startswith("done") for x in lines)  # killed mid-budget
    saved_at = read_checkpoint(tmp_path / "ckpt.pt")["extra"]["step"]
    assert saved_at % EVERY == 0
    assert KILL_AFTER - EVERY <= saved_at < STEPS_RESUME
    lost = len((tmp_path / "lr.log").read_text().splitlines()) - saved_at  # steps to redo

    code, lines = server.run(_train_job(kind, tmp_path))
    assert code == 0, server.log.read_text()
    assert lines[-1] == f"done {STEPS_RESUME}"  # the budget counted exactly 40 steps
    assert sum(x.startswith("step ") for x in lines) == STEPS_RESUME - saved_at  # no step more

    trajectory: dict[int, str] = {}
    for row in (tmp_path / "lr.log").read_text().splitlines():
        step, lr = row.split()
        # the steps the killed run took after its last checkpoint are redone identically
        assert trajectory.setdefault(int(step), lr) == lr, step
    assert sorted(trajectory) == list(range(1, STEPS_RESUME + 1))
    assert lost >= max(0, KILL_AFTER - saved_at)

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    model, _ = worker.train(
        kind, STEPS_RESUME, STEPS_RESUME + 1, straight_dir / "c.pt", straight_dir / "lr.log"
    )
    straight = [r.split()[1] for r in (straight_dir / "lr.log").read_text().splitlines()]
    assert [trajectory[s] for s in range(1, STEPS_RESUME + 1)] == straight
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, p in model.state_dict().items():
        assert torch.equal(final[name], p), name


def test_checksum_false_skips_the_data_hash_but_still_refuses_unsafe_values(
    victim, tmp_path
) -> None:
    model, opt, _ = victim
    path = graff.save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, checksum=False)
    assert torch.load(path, weights_only=True)["checksum"] is None
    before = _fingerprint(*victim)
    graff.load_checkpoint(path, model=model, optimizer=opt)
    assert _fingerprint(*victim) == before  # loaded its own state back
    with pytest.raises(GraffTypeError, match="cannot rebuild"):
        graff.save_checkpoint(tmp_path / "d.pt", extra=_RunsCode(tmp_path / "m"), checksum=False)


def test_model_hook_refusing_after_the_checks_restores_optimizer_and_scheduler(
    saved, victim
) -> None:
    """The one failure graff cannot foresee: the model's own load hook refuses a state whose
    keys and shapes fit. Optimizer and scheduler are put back; the error says so."""
    model, opt, sched = victim
    before = _fingerprint(*victim)[1:]

    def refuse(module, state_dict, prefix, *args) -> None:
        raise RuntimeError("custom hook says no")

    model.model.norm._register_load_state_dict_pre_hook(refuse)
    with pytest.raises(
        CheckpointError, match=r"optimizer and scheduler restored.*custom hook says no"
    ):
        graff.load_checkpoint(saved, model=model, optimizer=opt, scheduler=sched)
    assert _fingerprint(*victim)[1:] == before
