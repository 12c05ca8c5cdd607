"""Meters of the overhead benchmark: graff's own CPU time per object, and held tensor memory.

:class:`CpuMeter` wraps graff's per-step methods (the probes' hooks and λ̂ estimates, the
schedulers' loss capture and ``step()``) to read the thread-CPU time spent inside them;
:class:`ColdStartMeter` splits the λ̂ estimates' time into the cold start and the refreshes;
:func:`held_tensor_bytes` sums the tensor storage a scheduler keeps besides the model and the
optimizer state. Used by ``benchmarks.overhead`` and ``benchmarks.soak``.
"""

from __future__ import annotations

import gc
import time
import types
from typing import Any

import torch

import graff

#: graff's schedulers, each metered on its own class (no private base class is touched)
SCHEDULER_CLASSES = (graff.GraffScheduler, graff.ReactorScheduler, graff.BudgetScheduler)


class CpuMeter:
    """Thread-CPU seconds spent inside graff's own per-step code, per object (``id``).

    Wraps, before any scheduler is built (hooks bind the methods at registration), the
    curvature probe's optimizer hooks and its λ̂ estimates, the entropy probe's forward hook,
    the loss-capture hook and ``step()`` of graff's schedulers. ``per_step`` is what a step
    spends there *outside* λ̂ estimates; ``estimate`` the estimates alone. This direct reading
    is far less noisy than the difference of two step times on a shared machine; it misses
    only torch's own hook dispatch and cache effects on the rest of the step.
    """

    TARGETS = (
        (graff.CurvatureProbe, "_pre_hook", "hooks"),
        (graff.CurvatureProbe, "_post_hook", "hooks"),
        (graff.CurvatureProbe, "_timed_estimate", "estimate"),
        (graff.EntropyProbe, "_observe", "hooks"),
        # each public scheduler class (an inherited method is wrapped on the subclass itself)
        *((cls, name, "hooks") for cls in SCHEDULER_CLASSES for name in ("_capture_loss", "step")),
        # the reference's own scheduler.step() (LambdaLR): GRAFF replaces it, so its cost is
        # part of the reference step and is subtracted from GRAFF's direct cost ("net")
        (torch.optim.lr_scheduler.LRScheduler, "step", "hooks"),
    )

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, str], float] = {}
        #: per wrapped method, λ̂ estimates excluded: {(id(obj), "Class.method"): seconds}
        self.parts: dict[tuple[int, str], float] = {}
        self._saved: list[tuple[type, str, Any]] = []
        self._active: list[tuple[int, str]] = []  # the wrapped calls running now, outermost first

    def __enter__(self) -> CpuMeter:
        for cls, name, kind in self.TARGETS:
            own = cls.__dict__.get(name)  # None: inherited, wrapped here and deleted on exit
            self._saved.append((cls, name, own))
            setattr(cls, name, self._wrap(getattr(cls, name), kind, f"{cls.__name__}.{name}"))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, own in reversed(self._saved):
            if own is None:
                delattr(cls, name)
            else:
                setattr(cls, name, own)
        self._saved.clear()

    def _wrap(self, fn: Any, kind: str, label: str) -> Any:
        seconds, parts, active = self.seconds, self.parts, self._active

        def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            active.append((id(obj), label))
            try:
                return fn(obj, *args, **kwargs)
            finally:
                active.pop()
                spent = time.thread_time() - t0
                key = (id(obj), kind)
                seconds[key] = seconds.get(key, 0.0) + spent
                if kind == "estimate":  # not a per-step cost of the part it ran inside
                    for outer in active:
                        parts[outer] = parts.get(outer, 0.0) - spent
                else:
                    parts[(id(obj), label)] = parts.get((id(obj), label), 0.0) + spent

        return wrapper

    def parts_of(self, scheduler: Any) -> dict[str, float]:
        """Seconds per wrapped method of ``scheduler`` and its probes, estimates excluded.

        Nested calls count in each enclosing method too (``step()`` includes what it calls).
        """
        ids = {id(o) for o in self._objects(scheduler)}
        out: dict[str, float] = {}
        for (obj, label), value in self.parts.items():
            if obj in ids:
                out[label] = out.get(label, 0.0) + value
        return out

    @staticmethod
    def _objects(scheduler: Any) -> list[Any]:
        objs = [scheduler]
        for attr in ("curvature", "curvature_probe", "entropy_probe"):
            if getattr(scheduler, attr, None) is not None:
                objs.append(getattr(scheduler, attr))
        return objs

    def of(self, scheduler: Any) -> tuple[float, float]:
        """(seconds in hooks and step() without estimates, seconds in λ̂ estimates)."""
        objs = self._objects(scheduler)
        hooks = sum(self.seconds.get((id(o), "hooks"), 0.0) for o in objs)
        estimate = sum(self.seconds.get((id(o), "estimate"), 0.0) for o in objs)
        return hooks - estimate, estimate  # estimates run inside the post-step hook


def held_tensor_bytes(scheduler: Any, exclude: set[int]) -> int:
    """Bytes of distinct tensor storages reachable from ``scheduler`` minus ``exclude`` ids."""
    if scheduler is None:
        return 0
    seen, storages, total = set(), set(), 0
    stack = [scheduler]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in exclude:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in storages:
                storages.add(ptr)
                total += obj.untyped_storage().nbytes()
            continue
        if isinstance(obj, torch.nn.Module | torch.optim.Optimizer | type | types.ModuleType):
            continue  # the model and optimizer are the user's, not the scheduler's
        if isinstance(obj, types.FunctionType):  # closures, not the module's globals
            stack.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
            stack.extend(obj.__defaults__ or ())
            continue
        stack.extend(gc.get_referents(obj))
    return total


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def user_tensor_ids(model: torch.nn.Module, opt: torch.optim.Optimizer) -> set[int]:
    ids = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    for state in opt.state.values():
        ids |= {id(v) for v in state.values() if isinstance(v, torch.Tensor)}
    return ids


class ColdStartMeter:
    """Thread-CPU seconds of the λ̂ estimates that run before the first one is published.

    Those are the cold start (``initial_iters`` products, spread over a few steps for adaptive
    optimizers); refreshes are the estimates after it, including the ones a scheduler asks for
    outside the ``auto`` interval.
    """

    def __init__(self) -> None:
        self.cold: dict[int, float] = {}
        self.refresh: dict[int, float] = {}
        self._original: Any = None

    def __enter__(self) -> ColdStartMeter:
        original = self._original = graff.CurvatureProbe.__dict__["_timed_estimate"]
        cold, refresh = self.cold, self.refresh

        def wrapper(probe: Any, *args: Any, **kwargs: Any) -> Any:
            target = cold if probe.lambda_max is None else refresh
            t0 = time.thread_time()
            try:
                return original(probe, *args, **kwargs)
            finally:
                target[id(probe)] = target.get(id(probe), 0.0) + time.thread_time() - t0

        graff.CurvatureProbe._timed_estimate = wrapper  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        graff.CurvatureProbe._timed_estimate = self._original  # type: ignore[method-assign]
