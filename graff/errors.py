"""Exceptions raised by graff.

Every error graff raises on bad input is a subclass of a built-in exception users already
catch (``ValueError``, ``TypeError``, ``RuntimeError``), so ``except ValueError`` keeps working,
and carries a message that names the argument, the value received and what is allowed.
"""

from __future__ import annotations


class GraffError(Exception):
    """Base class of every exception graff raises on purpose."""


class GraffConfigError(GraffError, ValueError):
    """An argument has a value that is not allowed (wrong range, NaN, conflicting options)."""


class GraffTypeError(GraffError, TypeError):
    """An argument has the wrong type (e.g. an optimizer that is not a ``torch.optim.Optimizer``)."""


class CheckpointError(GraffError, ValueError):
    """A state dict or planner file is corrupt, truncated, of another version or another kind."""


class ProbeError(GraffError, RuntimeError):
    """A probe cannot run on the object it was given (e.g. no way to re-evaluate the loss)."""


class RankMismatchError(GraffError, RuntimeError):
    """Under ``torch.distributed``, the ranks disagree on something that must be the same."""


class GraffWarning(UserWarning):
    """Base class of the warnings graff issues (a probe turned off, a guess it had to make).

    Each message says what graff does instead and how to change it. To silence them all::

        warnings.filterwarnings("ignore", category=graff.errors.GraffWarning)
    """


class ProbeWarning(GraffWarning, RuntimeWarning):
    """A probe runs degraded or not at all (e.g. no λ̂ because the loss cannot be re-evaluated).

    Also a ``RuntimeWarning``, as these warnings were before :class:`GraffWarning` existed.
    """
