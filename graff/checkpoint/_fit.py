"""Does a saved state fit a live model or optimizer? Checked before anything is loaded.

``torch.nn.Module.load_state_dict`` copies parameter by parameter and reports a shape mismatch
only at the end, after copying the others; ``torch.optim.Optimizer.load_state_dict`` checks the
number of parameters per group but not the shapes of their state (Adam's moments of one
parameter can land on another of the same group when the order differs). These checks find
those mismatches first, so :func:`graff.load_checkpoint` can refuse a checkpoint whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from graff.errors import CheckpointError

# torch.optim classes some of whose non-scalar state tensors do not have their parameter's shape.
_NOT_PARAM_SHAPED = {"LBFGS", "Adafactor"}


def check_model_state(model: nn.Module, state: Any, strict: bool) -> None:
    """Raise CheckpointError unless ``model.load_state_dict(state, strict)`` fits key by key."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"model state is a {type(state).__name__}, not a state dict.")
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"the checkpoint's model state does not fit {type(model).__name__}: "
            f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}."
        )
    bad = []
    for key, want in expected.items():
        got = state.get(key)
        if key not in state or not isinstance(want, Tensor):
            continue
        if isinstance(want, nn.parameter.UninitializedTensorMixin):
            continue  # lazy modules take their shape from the checkpoint
        if not isinstance(got, Tensor):
            bad.append(f"{key}: a {type(got).__name__}, not a tensor")
        elif tuple(got.shape) != tuple(want.shape):
            bad.append(
                f"{key}: shape {tuple(got.shape)} in the checkpoint, {tuple(want.shape)} here"
            )
        elif _kind(got) != _kind(want):
            bad.append(f"{key}: dtype {got.dtype} in the checkpoint, {want.dtype} here")
    if bad:
        raise CheckpointError(
            f"the checkpoint's model state does not fit {type(model).__name__}: {_few(bad)}."
        )


def _kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "complex" if t.is_complex() else "float" if t.is_floating_point() else "int"


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Raise CheckpointError unless ``optimizer.load_state_dict(state)`` fits (torch's checks
    plus: each saved state tensor has the shape of the live one, or of its parameter)."""
    name = type(optimizer).__name__
    if (
        not isinstance(state, Mapping)
        or not isinstance(state.get("state"), Mapping)
        or not isinstance(state.get("param_groups"), list)
        or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list)
            for g in state["param_groups"]
        )
    ):
        raise CheckpointError("optimizer state is not a torch optimizer state dict.")
    groups, saved = optimizer.param_groups, state["param_groups"]
    if len(groups) != len(saved):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(saved)} parameter group(s), this {name} has "
            f"{len(groups)}."
        )
    for i, (group, saved_group) in enumerate(zip(groups, saved, strict=True)):
        if len(group["params"]) != len(saved_group["params"]):
            raise CheckpointError(
                f"parameter group {i} holds {len(saved_group['params'])} parameters in the "
                f"checkpoint, {len(group['params'])} in this {name}."
            )
    params = dict(
        zip(
            chain.from_iterable(g["params"] for g in saved),
            chain.from_iterable(g["params"] for g in groups),
            strict=True,
        )
    )
    param_shaped = type(optimizer).__module__.startswith("torch.optim") and (
        name not in _NOT_PARAM_SHAPED
    )
    for pid, entry in state["state"].items():
        param = params.get(pid)
        if param is None:
            continue
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"optimizer state of parameter {pid!r} is not a dict.")
        live = optimizer.state.get(param, {})
        for key, value in entry.items():
            if not isinstance(value, Tensor):
                continue
            ref = live.get(key)
            want = tuple(ref.shape) if isinstance(ref, Tensor) else None
            if want is None and param_shaped and value.dim() > 0:
                want = tuple(param.shape)
            if want is not None and tuple(value.shape) != want:
                raise CheckpointError(
                    f"optimizer state {key!r} of parameter {pid!r} has shape "
                    f"{tuple(value.shape)} in the checkpoint, expected {want}: the parameters "
                    "are not the ones (or not in the order) of the run that saved it."
                )


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(map(str, items[:n]))
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})" if items else "none"
