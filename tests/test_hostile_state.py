"""Corrupt, truncated, mismatched and malicious scheduler states and planner files.

Every leaf of a real ``state_dict()`` of each scheduler is, in turn, deleted or replaced by a
value of the wrong type, NaN, inf, a negative or enormous number, or a tensor of the wrong shape
or full of NaN. Each corrupted state must either load into a scheduler that still keeps every
invariant (``tests/hostile.py::check_invariants``, and one more step keeps them) or raise
:class:`graff.errors.CheckpointError` leaving the scheduler exactly as it was (its ``state_dict()`` is
unchanged: never half-loaded). Planner files that are truncated, random bytes, valid
safetensors of something else, planners of the wrong shapes, or pickles that would run code
must raise ``CheckpointError`` and never execute anything.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile import Setup, check_invariants, run_event
from safetensors.torch import save_file
from torch import Tensor, nn

import graff
from graff.errors import CheckpointError
from graff.planner.net import PlannerNet, _metadata, save_planner

EXHAUSTIVE = int(os.environ.get("GRAFF_HOSTILE_SCALE", "1")) > 1
STEP = {"loss": 1.0, "grad": "ok", "dt": 0.0, "lr_spike": False, "as_tensor": False}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    return


def make_setup(kind: str, seed: int = 0, groups: int = 1) -> Setup:
    """A trained-for-a-few-steps tiny setup of ``kind`` (deterministic, step budget)."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(3, generator=g)), nn.Parameter(torch.randn(2, generator=g))]
    if groups == 1:
        opt = torch.optim.Adam(params, lr=0.05)
    else:
        opt = torch.optim.Adam(
            [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}], lr=0.05
        )
    holder: dict[str, Setup] = {}

    def loss_fn() -> Tensor:
        return holder["s"].loss()

    now = [0.0]
    budget = graff.BudgetClock(steps=50, time_fn=lambda: now[0])  # time stands still: exact states
    if kind == "graff":
        sched = graff.GraffScheduler(
            opt,
            budget,
            loss_fn=loss_fn,
            config=graff.GraffConfig(
                planner=True, plan_every=2, curvature_every=2, block_multipliers=True
            ),
        )
    elif kind == "reactor":
        sched = graff.ReactorScheduler(
            opt,
            budget,
            loss_fn=loss_fn,
            guard=True,
            seed=seed,
            config=graff.ReactorConfig(decision_interval=2),
        )
    else:
        sched = graff.BudgetScheduler(opt, budget, prior="wsd")
    setup = Setup(
        params,
        opt,
        sched,
        now,
        [float(gr["initial_lr"]) for gr in opt.param_groups],
        kind,
        [torch.full(p.shape, 0.5) for p in params],
    )
    holder["s"] = setup
    for _ in range(13):
        run_event(setup, STEP)
    return setup


KINDS = ("graff", "reactor", "budget")


# ------------------------------------------------------------------ comparison helpers
def same(a: Any, b: Any) -> bool:
    """Deep equality of two states (tensors bitwise, NaN equal to NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(
                torch.equal(a, b)
                or ((a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()))
            )
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def leaves(obj: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths of every entry (dict values and list items) of a nested state, parents first."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*path, k)
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*path, i)
            yield from leaves(v, (*path, i))


DELETE = object()


def _replacements(value: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [
        ("delete", DELETE),
        ("None", None),
        ("string", "junk"),
        ("nan", math.nan),
        ("inf", math.inf),
        ("negative", -7),
        ("huge-int", 10**400),
        ("bool", True),
        ("list", [1.0, "x"]),
        ("dict", {"a": 1}),
    ]
    if isinstance(value, Tensor):
        out += [
            ("tensor-wrong-shape", torch.zeros(*(s + 1 for s in value.shape), 2)),
            ("tensor-0d", torch.tensor(1.0)),
            ("tensor-wrong-dtype", torch.zeros(value.shape, dtype=torch.int64) + 1),
        ]
        if value.is_floating_point() and value.numel():
            out += [
                ("tensor-nan", torch.full_like(value, math.nan)),
                ("tensor-inf", torch.full_like(value, math.inf)),
            ]
    return out


def mutated(state: dict, path: tuple, replacement: Any) -> dict:
    bad = copy.deepcopy(state)
    node = bad
    for key in path[:-1]:
        node = node[key]
    if replacement is DELETE:
        if isinstance(node, dict):
            del node[path[-1]]
        else:
            node.pop(path[-1])
    else:
        node[path[-1]] = replacement
    return bad


def try_load(setup: Setup, bad: Any, before: dict | None = None) -> str | None:
    """Load ``bad`` into ``setup``; the failure description, or None if graff kept its promise.

    ``before`` is the scheduler's current state (computed if not given); it is restored after
    an accepted load so that the next case starts from the same scheduler.
    """
    sched = setup.scheduler
    before = sched.state_dict() if before is None else before
    lrs = [g["lr"] for g in setup.optimizer.param_groups]
    try:
        sched.load_state_dict(bad)
    except CheckpointError:
        if not same(before, sched.state_dict()):
            return "raised CheckpointError but the scheduler was half-loaded"
        if lrs != [g["lr"] for g in setup.optimizer.param_groups]:
            return "raised CheckpointError but the optimizer LRs changed"
        return None
    except Exception as err:
        return f"raised {type(err).__name__}: {str(err)[:120]}"
    try:  # accepted: it must be a state graff can run from
        check_invariants(setup)
        for _ in range(2):
            run_event(setup, STEP)
            check_invariants(setup)
        sched.load_state_dict(copy.deepcopy(before))  # restore for the next case
    except Exception as err:
        return f"accepted, then {type(err).__name__}: {str(err)[:120]}"
    return None


# ------------------------------------------------------------------ the mutation sweep
@pytest.mark.parametrize("kind", KINDS)
def test_every_corrupted_entry_is_rejected_cleanly_or_harmless(kind: str) -> None:
    """Each leaf × each corruption: CheckpointError with nothing changed, or a working state."""
    source = make_setup(kind, seed=1).scheduler.state_dict()
    target = make_setup(kind, seed=2)
    before = target.scheduler.state_dict()
    failures, cases, seen = [], 0, set()
    for path in leaves(source):
        shape = tuple("#" if isinstance(k, int) or str(k).isdigit() else k for k in path)
        if not EXHAUSTIVE and shape in seen:
            continue  # CI: one entry of each list/per-parameter dict (all with GRAFF_HOSTILE_SCALE>1)
        seen.add(shape)
        node = source
        for key in path:
            node = node[key]
        options = _replacements(node)
        if not EXHAUSTIVE:  # CI: 5 corruptions per entry, rotating so that all kinds occur
            options = [options[(len(seen) + j) % len(options)] for j in range(5)]
        for name, replacement in options:
            cases += 1
            problem = try_load(target, mutated(source, path, replacement), before)
            if problem:
                failures.append(f"{'/'.join(map(str, path))} <- {name}: {problem}")
                target = make_setup(kind, seed=2)  # it may be broken: start the next case afresh
                before = target.scheduler.state_dict()
    print(f"{kind}: {cases} corrupted states tried")
    assert not failures, f"{len(failures)} of {cases} cases:\n" + "\n".join(failures[:400])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "junk",
    [None, [], "state", 3, b"\x00" * 8, {"format_version": 1}, {}],
    ids=["None", "list", "str", "int", "bytes", "only-version", "empty"],
)
def test_states_that_are_not_states_raise_checkpoint_error(kind: str, junk) -> None:
    setup = make_setup(kind)
    assert try_load(setup, junk) is None
    with pytest.raises(CheckpointError):
        setup.scheduler.load_state_dict(junk)


@pytest.mark.parametrize("saved", KINDS)
@pytest.mark.parametrize("loaded", KINDS)
def test_state_of_another_scheduler_type_or_group_count_is_rejected(
    saved: str, loaded: str
) -> None:
    state = make_setup(saved).scheduler.state_dict()
    if saved != loaded:
        target = make_setup(loaded)
        assert try_load(target, state) is None
        with pytest.raises(CheckpointError, match=saved.capitalize()[:4]):
            target.scheduler.load_state_dict(state)
    two = make_setup(loaded, groups=2)
    other = state if saved == loaded else make_setup(loaded).scheduler.state_dict()
    assert try_load(two, other) is None
    with pytest.raises(CheckpointError, match="group"):
        two.scheduler.load_state_dict(other)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5])
def test_other_format_versions_are_rejected(kind: str, version) -> None:
    setup = make_setup(kind)
    state = dict(setup.scheduler.state_dict(), format_version=version)
    assert try_load(setup, state) is None
    with pytest.raises(CheckpointError, match="format_version"):
        setup.scheduler.load_state_dict(state)


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_checkpoint_bytes_are_rejected_by_torch_load(kind: str, tmp_path: Path) -> None:
    """A truncated ``torch.save`` file fails in ``torch.load`` (before graff sees it)."""
    buf = io.BytesIO()
    torch.save({"sched": make_setup(kind).scheduler.state_dict()}, buf)
    data = buf.getvalue()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises((RuntimeError, EOFError, ValueError, pickle.UnpicklingError)):
            torch.load(io.BytesIO(data[:cut]), weights_only=True)
    state = torch.load(io.BytesIO(data), weights_only=True)["sched"]
    target = make_setup(kind, seed=5)
    target.scheduler.load_state_dict(state)  # the full file loads with weights_only=True
    check_invariants(target)


# ------------------------------------------------------------------ planner files
def _trained_planner_file(tmp_path: Path) -> Path:
    sched = make_setup("graff").scheduler
    return sched.save_planner(tmp_path / "planner.safetensors")


def _load(path: Path | str) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    graff.GraffScheduler(
        opt, graff.BudgetClock(steps=5), warm_start=path, config=graff.GraffConfig(planner=True)
    )


def test_truncated_planner_files_are_checkpoint_errors(tmp_path: Path) -> None:
    data = _trained_planner_file(tmp_path).read_bytes()
    cuts = sorted({0, 1, 7, 8, 9, 100, len(data) // 2, len(data) - 4, len(data) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            graff.load_planner(path)
        with pytest.raises(CheckpointError):
            _load(path)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_are_checkpoint_errors(tmp_path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    size = int(torch.randint(1, 4096, (1,), generator=g))
    data = bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).tolist())
    if seed % 2:  # a plausible 8-byte header length in front of junk
        data = (len(data) - 8).to_bytes(8, "little") + data[8:]
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        graff.load_planner(path)


def test_bit_flips_in_a_planner_file_never_load_a_broken_planner(tmp_path: Path) -> None:
    """Flip one byte at many offsets: CheckpointError, or a planner with finite weights."""
    data = bytearray(_trained_planner_file(tmp_path).read_bytes())
    path = tmp_path / "flip.safetensors"
    for offset in range(0, len(data), max(1, len(data) // 300)):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        path.write_bytes(bytes(flipped))
        try:
            planner = graff.load_planner(path)
        except CheckpointError:
            continue
        assert all(bool(torch.isfinite(t).all()) for t in planner.state_dict().values())


def test_valid_safetensors_that_is_not_a_planner(tmp_path: Path) -> None:
    for meta in (None, {"format": "graff-planner"}, {"format": "other", "format_version": "1"}):
        path = tmp_path / "other.safetensors"
        save_file({"weight": torch.zeros(4, 4)}, str(path), metadata=meta)
        with pytest.raises(CheckpointError):
            graff.load_planner(path)


def _planner_file(tmp_path: Path, tensors: dict[str, Tensor], **meta: str) -> Path:
    path = tmp_path / "shaped.safetensors"
    save_file(tensors, str(path), metadata=_metadata(PlannerNet()) | meta)
    return path


def test_planners_with_wrong_shapes_or_values_are_checkpoint_errors(tmp_path: Path) -> None:
    good = {k: v.clone() for k, v in PlannerNet().state_dict().items()}
    cases: list[tuple[str, dict[str, Tensor], dict[str, str]]] = [
        ("missing tensor", {k: v for k, v in good.items() if k != "lr_w"}, {}),
        ("extra tensor", good | {"extra": torch.zeros(1)}, {}),
        ("wrong shape", good | {"lr_w": torch.zeros(17)}, {}),
        ("nan weight", good | {"lr_b": torch.tensor(math.nan)}, {}),
        (
            "inf weight",
            good | {"encode.weight": torch.full_like(good["encode.weight"], math.inf)},
            {},
        ),
        ("int weights", good | {"lr_w": torch.zeros(16, dtype=torch.int64)}, {}),
        ("hidden mismatch", good, {"hidden": "32"}),
        ("hidden not a number", good, {"hidden": "sixteen"}),
        ("negative hidden", good, {"hidden": "-1"}),
        ("enormous hidden", good, {"hidden": "1000000000", "message": "1000000000"}),
        ("other features", good, {"features": "a,b,c"}),
        ("other version", good, {"format_version": "2"}),
    ]
    failures = []
    for name, tensors, meta in cases:
        path = _planner_file(tmp_path, tensors, **meta)
        try:
            graff.load_planner(path)
        except CheckpointError:
            continue
        except Exception as err:
            failures.append(f"{name}: {type(err).__name__}: {err}")
        else:
            failures.append(f"{name}: loaded")
    assert not failures, failures


def test_pickled_checkpoint_that_would_run_code_is_not_executed(tmp_path: Path) -> None:
    """A pickle whose loading runs code (creates a marker file) is refused, never executed."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps({"planner": Evil()})
    for name in ("evil.safetensors", "evil.pt", "evil.bin"):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(CheckpointError):
            graff.load_planner(path)
        with pytest.raises(CheckpointError):
            _load(path)
    torch_file = tmp_path / "evil_torch.pt"
    torch.save({"sched": Evil()}, torch_file)
    with pytest.raises(CheckpointError):
        graff.load_planner(torch_file)
    with pytest.raises(pickle.UnpicklingError):  # the documented way to read scheduler states
        torch.load(torch_file, weights_only=True)
    assert not marker.exists(), "loading ran the pickle's code"


def test_planner_paths_that_are_not_files(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing.safetensors", "", "/dev/null"):
        with pytest.raises(CheckpointError):
            graff.load_planner(path)


def test_save_planner_round_trip_is_exact(tmp_path: Path) -> None:
    sched = make_setup("graff").scheduler
    path = save_planner(sched.planner, tmp_path / "p.safetensors")
    loaded = graff.load_planner(path)
    for (k, a), (k2, b) in zip(
        sched.planner.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_is_a_snapshot_that_training_does_not_change(kind: str) -> None:
    """An in-memory ``state_dict()`` must not alias live tensors (planner Adam state, ...)."""
    setup = make_setup(kind)
    state = setup.scheduler.state_dict()
    snapshot = copy.deepcopy(state)
    for _ in range(5):
        run_event(setup, STEP)
    assert same(state, snapshot)
