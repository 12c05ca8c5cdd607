"""Saving and loading GRAFF planners (warm start / transfer between models).

A planner file holds only the planner's weights — never its latent state ``h``, whose size
depends on the number of blocks — so a planner trained on one model loads into a scheduler for
another. Files are `safetensors <https://huggingface.co/docs/safetensors>`_: loading one can
never execute code. Anything that is not a graff planner is a clear
:class:`~graff.errors.CheckpointError`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from graff.errors import CheckpointError
from graff.planner_net import FEATURE_NAMES, PlannerNet

PLANNER_FORMAT = "graff-planner"
PLANNER_FORMAT_VERSION = "1"
DEFAULT_PLANNER = "default"


def _metadata(planner: PlannerNet) -> dict[str, str]:
    return {
        "format": PLANNER_FORMAT,
        "format_version": PLANNER_FORMAT_VERSION,
        "features": ",".join(FEATURE_NAMES),
        "num_features": str(planner.num_features),
        "hidden": str(planner.hidden),
        "message": str(planner.message_size),
    }


def save_planner(planner: PlannerNet, path: str | Path) -> Path:
    """Write ``planner``'s weights and a format header to ``path`` (safetensors). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in planner.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=_metadata(planner))
    tmp.replace(path)  # atomic: a crash leaves the old file or the new one, never half of one
    return path


def default_planner_path() -> Path:
    """Path of the planner shipped inside the package (``warm_start="default"``)."""
    return Path(str(resources.files("graff") / "planners" / "default.safetensors"))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a graff planner file (safetensors): {err}") from err


def load_planner(path: str | Path) -> PlannerNet:
    """Load a planner saved by :func:`save_planner` (or ``"default"``, the shipped one).

    Raises:
        CheckpointError: if the file is missing, corrupt, not a planner, of another format
            version, or made for other input features.
    """
    source = default_planner_path() if str(path) == DEFAULT_PLANNER else Path(path)
    if not source.is_file():
        raise CheckpointError(f"planner file {source} does not exist.")
    tensors, meta = _read(source)
    if meta.get("format") != PLANNER_FORMAT:
        raise CheckpointError(f"{source} is not a graff planner (format={meta.get('format')!r}).")
    if meta.get("format_version") != PLANNER_FORMAT_VERSION:
        raise CheckpointError(
            f"{source} is planner format version {meta.get('format_version')!r}; this graff reads "
            f"version {PLANNER_FORMAT_VERSION}."
        )
    if meta.get("features") != ",".join(FEATURE_NAMES):
        raise CheckpointError(
            f"{source} was trained on other input features: {meta.get('features')!r}."
        )
    try:
        features, hidden, message = (int(meta[k]) for k in ("num_features", "hidden", "message"))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source} has an invalid planner header: {err}") from err
    # Check the sizes against the stored tensors before building anything: a forged header
    # (hidden=10**9) must not make graff allocate a huge network.
    expected = {
        "lr_w": (hidden,),
        "encode.weight": (hidden, features),
        "message.weight": (message, 2 * hidden),
    }
    for key, shape in expected.items():
        t = tensors.get(key)
        if t is None or tuple(t.shape) != shape or not t.is_floating_point():
            raise CheckpointError(
                f"{source} holds planner weights that do not fit its header: {key} should be a "
                f"float tensor of shape {shape}, got {None if t is None else (t.dtype, tuple(t.shape))}."
            )
    if not all(t.is_floating_point() for t in tensors.values()):
        raise CheckpointError(f"{source} holds planner weights that are not floating point.")
    try:
        planner = PlannerNet(features, hidden, message)
        planner.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source} holds planner weights that do not fit: {err}") from err
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise CheckpointError(f"{source} holds non-finite planner weights.")
    return planner
