"""REACTOR's checkpoint schema and the checks that run before anything is loaded.

:meth:`graff.schedulers.reactor.ReactorScheduler.state_dict` stores its controller as flat entries of
``state_dict()["extra"]``; this module lists them once, says which are malformed, and builds
(or test-loads) the components a state describes without touching the live scheduler, so a
bad state raises :class:`~graff.errors.CheckpointError` and changes nothing.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from graff._checks import is_count, is_finite_real
from graff.errors import CheckpointError
from graff.schedulers.reactor_policy import STATE_FEATURES

#: Keys of the controller's checkpoint (``state_dict()["extra"]``) and their kinds.
INT_KEYS = ("seed", "decisions", "updates", "skipped_updates", "in_interval", "baseline_count")
FLOAT_KEYS = ("log_factor", "prev_fraction", "baseline_raw")
OPTIONAL_FLOAT_KEYS = ("prev_mean", "ref_loss", "ref_grad", "prev_entropy", "pending_u")
OTHER_KEYS = ("positions", "losses", "pending_state", "policy", "policy_optimizer")


def invalid_controller_entries(extra: dict[str, Any]) -> list[str]:
    """Names of the entries of a controller checkpoint that are missing or malformed."""
    keys = (*INT_KEYS, *FLOAT_KEYS, *OPTIONAL_FLOAT_KEYS, *OTHER_KEYS)
    missing = [k for k in keys if k not in extra]
    if missing:
        return missing
    bad = [k for k in INT_KEYS if not is_count(extra[k])]
    bad += [k for k in FLOAT_KEYS if not is_finite_real(extra[k])]
    bad += [k for k in OPTIONAL_FLOAT_KEYS if extra[k] is not None and not is_finite_real(extra[k])]
    pos, losses = extra["positions"], extra["losses"]
    if not (
        isinstance(pos, list)
        and isinstance(losses, list)
        and len(pos) == len(losses)
        and all(is_count(p) for p in pos)
        and all(is_finite_real(x) for x in losses)
    ):
        bad.append("positions/losses")
    pending = extra["pending_state"]
    if (pending is None) != (extra["pending_u"] is None) or (
        pending is not None
        and (
            not isinstance(pending, Tensor)
            or tuple(pending.shape) != (len(STATE_FEATURES),)
            or not pending.is_floating_point()
            or not bool(pending.isfinite().all())
        )
    ):
        bad.append("pending_state/pending_u")
    return bad


def load_controller(
    template: nn.Module, extra: dict[str, Any], *, controller_lr: float, hidden_size: int
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A copy of the policy ``template`` and a fresh Adam, both loaded from ``extra``.

    The live policy is not touched: the scheduler validates a state by building these and
    dropping them, and loads it by building them again and keeping them.

    Raises:
        CheckpointError: the saved policy or its Adam state does not fit ``template``, or
            the saved weights are not finite.
    """
    policy = copy.deepcopy(template)
    opt = torch.optim.Adam(policy.parameters(), lr=controller_lr)
    try:
        policy.load_state_dict(extra["policy"])
        opt.load_state_dict(extra["policy_optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"ReactorScheduler state has a policy that does not fit this one "
            f"(hidden_size={hidden_size}): {err}"
        ) from err
    if not all(bool(torch.isfinite(t).all()) for t in policy.state_dict().values()):
        raise CheckpointError("ReactorScheduler state has non-finite policy weights.")
    return policy, opt


def check_probe_state(probe: Any, state: Any, name: str) -> None:
    """Check that ``probe`` accepts ``state``: load it, then restore the probe's own state.

    ``probe`` is the probe the scheduler owns (``None`` if it owns none); a state must carry a
    probe state exactly when the scheduler owns that probe.
    """
    if (probe is None) != (state is None):
        raise CheckpointError(
            f"ReactorScheduler state {'has' if state is not None else 'lacks'} a {name} state, "
            f"but this scheduler {'owns' if probe is not None else 'does not own'} one; build it "
            "with the same model=/probe arguments."
        )
    if probe is None:
        return
    old = probe.state_dict()
    try:
        probe.load_state_dict(state)
    except (CheckpointError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"ReactorScheduler state has an invalid {name} state: {err}") from err
    finally:
        probe.load_state_dict(old)
