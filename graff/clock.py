"""The budget that schedules plan against: wall-clock seconds or optimizer steps.

A :class:`BudgetClock` answers one question for a scheduler: *what fraction of the budget is
used?* Budgets are either wall-clock time (the seed's "30 minutes on one GPU, evaluation
included") or a number of optimizer steps (deterministic: for tests, benchmarks and
reproducible runs). Time is read from a monotonic clock, after ``torch.cuda.synchronize()``
when CUDA is in use so that queued asynchronous kernels are counted. Time spent inside
:meth:`BudgetClock.paused` does not count, and neither does the downtime between saving a
checkpoint and resuming from it.

The remaining budget fed to the planners is

.. math::

    b_t = 1 - \\min\\bigl(1, \\max(0, \\mathrm{elapsed}_t / B)\\bigr),

where :math:`B` is the budget (seconds or steps) and ``fraction_used`` is :math:`1 - b_t`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from graff._checks import check_positive, is_count, is_finite_real
from graff.energy import EnergyMeter
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError

BudgetKind = Literal["seconds", "steps"]
_FORMAT_VERSION = 1
_FLOAT_MAX = sys.float_info.max


def _cuda_synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class BudgetClock:
    """A wall-clock or step budget with pause, resume and (optional) energy metering.

    Give exactly one of ``seconds``, ``minutes``, ``hours`` (a wall-clock budget) or ``steps``
    (a budget of optimizer steps).

    Args:
        seconds: Wall-clock budget in seconds.
        minutes: Wall-clock budget in minutes (``seconds = 60 * minutes``).
        hours: Wall-clock budget in hours.
        steps: Budget in optimizer steps; :meth:`tick` counts them.
        time_fn: Monotonic time source in seconds (default :func:`time.monotonic`). Tests pass
            a fake clock so that nothing sleeps. Readings that go backwards or are not finite
            are ignored: elapsed time never decreases.
        sync_cuda: Call ``torch.cuda.synchronize()`` before reading the time when CUDA is
            initialised, so asynchronous kernels are charged to the budget.
        measure_energy: Read GPU energy through NVML when available (see :attr:`energy_joules`).

    Raises:
        GraffConfigError: if not exactly one budget is given, or it is zero, negative, NaN or
            infinite.
        GraffTypeError: if ``time_fn`` is not callable.

    Examples:
        >>> clock = BudgetClock(steps=4)
        >>> clock.start().tick().tick().fraction_used
        0.5
        >>> fake_now = [0.0]
        >>> clock = BudgetClock(minutes=1, time_fn=lambda: fake_now[0]).start()
        >>> fake_now[0] = 15.0
        >>> clock.remaining
        45.0
    """

    def __init__(
        self,
        seconds: float | None = None,
        *,
        minutes: float | None = None,
        hours: float | None = None,
        steps: int | None = None,
        time_fn: Callable[[], float] | None = None,
        sync_cuda: bool = True,
        measure_energy: bool = True,
    ) -> None:
        given = {
            k: v
            for k, v in (
                ("seconds", seconds),
                ("minutes", minutes),
                ("hours", hours),
                ("steps", steps),
            )
            if v is not None
        }
        if len(given) != 1:
            raise GraffConfigError(
                "BudgetClock needs exactly one of seconds=, minutes=, hours= or steps=, got "
                f"{sorted(given) or 'none'}."
            )
        ((name, value),) = given.items()
        total = check_positive(f"BudgetClock({name}=...)", value)
        if name == "steps":
            if not float(total).is_integer():
                raise GraffConfigError(
                    f"BudgetClock(steps=...) must be a whole number, got {value!r}."
                )
            self.kind: BudgetKind = "steps"
            self.total: float = float(int(total))
        else:
            self.kind = "seconds"
            self.total = total * {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0}[name]
            if not math.isfinite(self.total):
                raise GraffConfigError(
                    f"BudgetClock({name}=...) must be finite in seconds, got {value!r}."
                )
        if time_fn is not None and not callable(time_fn):
            raise GraffTypeError(f"time_fn must be callable, got {time_fn!r}.")
        self._time_fn: Callable[[], float] = time_fn or time.monotonic
        self._sync_cuda = bool(sync_cuda)
        self._banked = 0.0  # seconds counted in finished segments (and before a resume)
        self._segment_start: float | None = None  # None: not running (not started or paused)
        self._started = False
        self._pause_depth = 0
        self._last_now = -math.inf
        self._max_elapsed = 0.0
        self._agreed: float | None = None  # under torch.distributed: rank 0's elapsed seconds
        self._steps = 0
        self._energy = EnergyMeter() if measure_energy else None
        self._energy_start: float | None = None
        self._energy_banked = 0.0

    # ------------------------------------------------------------------ time
    def _now(self) -> float:
        if self._sync_cuda:
            _cuda_synchronize()
        now = float(self._time_fn())
        if not math.isfinite(now) or now < self._last_now:
            now = self._last_now  # a clock that jumps backwards or returns junk counts nothing
        self._last_now = now
        return now

    def start(self) -> BudgetClock:
        """Start counting (idempotent). Returns ``self`` so calls can be chained."""
        if not self._started:
            self._started = True
            self._segment_start = self._now() if self._pause_depth == 0 else None
            if self._energy is not None:
                self._energy_start = self._energy.read()
        return self

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._started

    @property
    def elapsed_seconds(self) -> float:
        """Wall-clock seconds counted so far (pauses and resume downtime excluded).

        Under ``torch.distributed`` a scheduler makes every rank adopt rank 0's reading at each
        of its steps (:mod:`graff.distributed`); between two steps this value then holds, so
        every rank sees the budget run out on the same step.
        """
        if self._agreed is not None:
            return self._agreed
        return self.local_elapsed_seconds()

    def agree_elapsed(self, seconds: float) -> None:
        """Adopt the elapsed time all ranks agreed on (rank 0's; a scheduler calls this per step
        under ``torch.distributed``); the reading never goes back."""
        self._agreed = max(self._agreed or 0.0, float(seconds))

    def local_elapsed_seconds(self) -> float:
        """This process's own reading of the elapsed time (what it would agree on alone)."""
        running = 0.0
        if self._segment_start is not None:
            now = self._now()
            if self._segment_start == -math.inf:  # started before the first finite reading
                self._segment_start = now
            if math.isfinite(now):
                running = max(0.0, now - self._segment_start)
        # Readings ±1e308 apart would give an infinite elapsed time: cap at the largest float.
        elapsed = min(self._banked + running, _FLOAT_MAX)
        self._max_elapsed = max(self._max_elapsed, elapsed)
        return self._max_elapsed

    @contextmanager
    def paused(self) -> Iterator[BudgetClock]:
        """Context manager: time spent inside does not count against the budget (nestable).

        Examples:
            >>> fake_now = [0.0]
            >>> clock = BudgetClock(seconds=10, time_fn=lambda: fake_now[0]).start()
            >>> with clock.paused():
            ...     fake_now[0] = 5.0
            >>> clock.elapsed_seconds
            0.0
        """
        if self._pause_depth == 0 and self._segment_start is not None:
            self._banked = self.local_elapsed_seconds()
            self._segment_start = None
        self._pause_depth += 1
        try:
            yield self
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0 and self._started:
                self._segment_start = self._now()

    # ----------------------------------------------------------------- steps
    def tick(self, n: int = 1) -> BudgetClock:
        """Count ``n`` optimizer steps (starts the clock if needed). Returns ``self``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise GraffConfigError(f"tick(n) needs a non-negative integer n, got {n!r}.")
        self.start()
        self._steps += n
        return self

    @property
    def steps(self) -> int:
        """Optimizer steps counted by :meth:`tick`."""
        return self._steps

    # ---------------------------------------------------------------- budget
    @property
    def elapsed(self) -> float:
        """Budget used, in the budget's unit (seconds, or steps for a step budget)."""
        return float(self._steps) if self.kind == "steps" else self.elapsed_seconds

    @property
    def remaining(self) -> float:
        """Budget left, in the budget's unit, never negative."""
        return max(0.0, self.total - self.elapsed)

    @property
    def fraction_used(self) -> float:
        """Fraction of the budget used, clamped to [0, 1]."""
        return min(1.0, max(0.0, self.elapsed / self.total))

    @property
    def exhausted(self) -> bool:
        """Whether the whole budget is used."""
        return self.elapsed >= self.total

    @property
    def energy_joules(self) -> float | None:
        """GPU energy used since :meth:`start` (NVML), or ``None`` where it cannot be measured."""
        if self._energy is None or self._energy_start is None:
            return None
        now = self._energy.read()
        if now is None:
            return None
        return self._energy_banked + max(0.0, now - self._energy_start)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Budget, counted time and steps; resuming continues where this stopped."""
        return {
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "total": self.total,
            "elapsed_seconds": self.elapsed_seconds,
            "steps": self._steps,
            "started": self._started,
            "energy_joules": self.energy_joules,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved budget. Time between the save and this call is not counted.

        Raises:
            CheckpointError: if ``state`` is not a BudgetClock state of this version, or was
                saved for a different budget kind.
        """
        if not isinstance(state, dict) or state.get("format_version") != _FORMAT_VERSION:
            raise CheckpointError(
                "Not a BudgetClock state of format_version "
                f"{_FORMAT_VERSION}: got {type(state).__name__} with version "
                f"{state.get('format_version') if isinstance(state, dict) else None!r}."
            )
        missing = {"kind", "total", "elapsed_seconds", "steps", "started"} - set(state)
        if missing:
            raise CheckpointError(f"BudgetClock state is missing keys {sorted(missing)}.")
        if state["kind"] != self.kind:
            raise CheckpointError(
                f"BudgetClock state is a {state['kind']!r} budget but this clock counts {self.kind!r}."
            )
        elapsed, steps, total = state["elapsed_seconds"], state["steps"], state["total"]
        energy, started = state.get("energy_joules"), state["started"]
        bad = [
            name
            for name, ok in (
                ("elapsed_seconds", is_finite_real(elapsed) and elapsed >= 0),
                ("steps", is_count(steps)),
                ("total", is_finite_real(total) and total > 0),
                ("energy_joules", energy is None or (is_finite_real(energy) and energy >= 0)),
                ("started", isinstance(started, bool)),
            )
            if not ok
        ]
        if bad:
            shown = ", ".join(f"{k}={state.get(k)!r:.40}" for k in bad)
            raise CheckpointError(f"BudgetClock state has invalid {shown}.")
        elapsed = float(elapsed)
        self.total = float(total)
        self._banked = self._max_elapsed = elapsed
        self._agreed = None
        self._steps = steps
        self._started = started
        self._segment_start = self._now() if self._started and self._pause_depth == 0 else None
        energy = state.get("energy_joules")
        self._energy_banked = float(energy) if energy is not None else 0.0
        self._energy_start = self._energy.read() if self._energy is not None else None

    def __repr__(self) -> str:
        unit = "steps" if self.kind == "steps" else "s"
        return (
            f"BudgetClock({self.total:g} {unit}, used {self.elapsed:.4g} {unit}, "
            f"fraction_used={self.fraction_used:.3f})"
        )
