"""Save and resume a training run: model, optimizer, scheduler and budget clock in one file.

A checkpoint is a plain :func:`torch.save` file holding a dict of torch's own state dicts:

    {"format": "graff.checkpoint", "format_version": 1, "checksum": "sha256:...",
     "graff_version": ..., "torch_version": ..., "types": {"optimizer": "AdamW", ...},
     "model": model.state_dict(), "optimizer": opt.state_dict(),
     "scheduler": sched.state_dict(),  # graff schedulers include their BudgetClock
     "extra": <your own tensors, numbers, strings, lists and dicts>}

so ``torch.load(path, weights_only=True)`` reads it without graff. What the two functions add:

- **Atomic write.** :func:`save_checkpoint` writes a temporary file in the target's directory,
  flushes and fsyncs it, renames it over the target with :func:`os.replace` (atomic on
  POSIX and Windows) and fsyncs the directory. A process killed at any point leaves the
  previous checkpoint or the new one, never a mix; at worst a stray ``.<name>.*.tmp`` file
  (safe to delete).
- **No code on load.** :func:`load_checkpoint` reads with ``torch.load(..., weights_only=True)``,
  which rebuilds only tensors and plain containers: a file crafted to run code when unpickled
  raises :class:`~graff.errors.CheckpointError` instead. (Types you allow-listed yourself with
  ``torch.serialization.add_safe_globals`` are still accepted.)
- **Corruption is detected.** ``torch.load`` does not check the zip records' CRC, so a flipped
  byte can load as other numbers. The file carries a SHA-256 checksum of its content,
  verified on load (unless saved with ``checksum=False``).
- **No half-loaded run.** Everything is validated before anything changes: the file, the format
  version, the checksum, the optimizer and scheduler types, the model's keys, shapes and dtype
  kinds, the optimizer's parameter groups and the shapes of its state. The optimizer and the
  scheduler are then loaded as a transaction (the scheduler validates its own state; if it
  still refuses, both are rolled back), the model last. Any mismatch raises
  :class:`~graff.errors.CheckpointError` and leaves model, optimizer and scheduler as they were.
  One case cannot be undone without a copy of the weights: a model whose own custom load hook
  refuses a state that has the right keys, shapes and dtypes; the optimizer and scheduler are
  then restored and the error says the model may be partly loaded.

Resume with the *same* budget and configuration: build model, optimizer and scheduler exactly as
in the first run, then call :func:`load_checkpoint`. With a step budget the resumed run follows
the uninterrupted run's LR trajectory exactly; with a wall-clock budget the downtime between the
save and the load is not counted.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graff._version import __version__
from graff.checkpoint._checksum import payload_digest
from graff.checkpoint._fit import check_model_state, check_optimizer_state
from graff.errors import CheckpointError, GraffTypeError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "graff.checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_PARTS = ("model", "optimizer", "scheduler")


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: Any = None,
    checksum: bool = True,
) -> Path:
    """Atomically write model, optimizer, scheduler (with its budget clock) and ``extra`` to ``path``.

    Args:
        path: Target file; its parent directories are created. An existing file is replaced
            only once the new one is completely on disk.
        model: Module whose ``state_dict()`` is saved (unwrap DDP/``torch.compile`` first, or
            load into the same wrapper).
        optimizer: Optimizer whose ``state_dict()`` is saved.
        scheduler: A graff scheduler (its state holds the budget clock) or any object with
            ``state_dict()``/``load_state_dict()``, e.g. a torch ``LRScheduler``.
        extra: Your own resumable state (step counter, data-loader position, RNG states as
            tensors, ...): ``None``, numbers, strings, bytes, tensors and dicts/lists/tuples
            of them.
        checksum: Store a SHA-256 checksum of the content, verified by :func:`load_checkpoint`
            (one pass over the tensors on save and on load, about 2 s per GB on a 2-core CPU).
            ``False`` skips it for very large checkpoints: corrupt tensor bytes then go
            undetected. Values that could not be loaded safely are refused either way.

    Returns:
        The path written.

    Raises:
        GraffTypeError: if an argument has the wrong type, or a state holds a value that
            ``torch.load(..., weights_only=True)`` could not rebuild (nothing is written).
        OSError: if the file cannot be written (the previous checkpoint is untouched).

    Examples:
        >>> import tempfile, torch, graff
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sched = graff.BudgetScheduler(opt, budget=graff.BudgetClock(steps=10))
        >>> path = graff.save_checkpoint(
        ...     tempfile.mkdtemp() + "/ckpt.pt", model=model, optimizer=opt, scheduler=sched,
        ...     extra={"step": 0})
        >>> graff.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
        {'step': 0}
    """
    if model is not None and not isinstance(model, nn.Module):
        raise GraffTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GraffTypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if scheduler is not None and not callable(getattr(scheduler, "state_dict", None)):
        raise GraffTypeError(
            f"scheduler must have state_dict()/load_state_dict(), got {type(scheduler).__name__}."
        )
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "graff_version": __version__,
        "torch_version": str(torch.__version__),
        "types": {k: None if v is None else type(v).__name__ for k, v in parts.items()},
        **{k: None if v is None else v.state_dict() for k, v in parts.items()},
        "extra": extra,
    }
    digest = payload_digest(payload, data=checksum)  # also refuses what weights_only can't load
    payload["checksum"] = digest if checksum else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(payload, path)
    return path


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a fresh temporary file beside ``path``, fsync, rename, fsync the dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # O_EXCL: never shares a temporary file with another writer
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename itself is atomic
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    map_location: Any = "cpu",
    strict: bool = True,
) -> Any:
    """Restore the parts you pass from a :func:`save_checkpoint` file; all of them or none.

    Build model, optimizer and scheduler exactly as for the first run (same parameter groups,
    same scheduler type and budget), then call this. Parts you do not pass are not loaded.

    Args:
        path: A file written by :func:`save_checkpoint`.
        model: Module to load the saved model state into.
        optimizer: Optimizer to load the saved optimizer state into.
        scheduler: Scheduler to load the saved scheduler state (and budget clock) into; it
            re-applies its LRs to the optimizer.
        map_location: Passed to :func:`torch.load` (default ``"cpu"``; the optimizer moves its
            state to its parameters' device, the model copies into its own tensors).
        strict: Passed to ``model.load_state_dict``: with ``False``, missing and unexpected
            keys are allowed (shapes must still match).

    Returns:
        The ``extra`` object saved with the checkpoint (``None`` if none).

    Raises:
        CheckpointError: if the file is missing, truncated, corrupt, not a graff checkpoint, of
            another format version, holds objects that would run code when loaded, lacks a
            part you passed, or does not fit the model, optimizer or scheduler given. Nothing
            is modified then (the one exception, a model's own load hook refusing after the
            checks, is described in the module docstring and named in the message).
    """
    payload = read_checkpoint(path, map_location=map_location)
    given = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    for name, obj in given.items():
        if obj is None:
            continue
        if payload[name] is None:
            raise CheckpointError(f"{path} holds no {name} state, but a {name} was given.")
        saved_type = payload["types"].get(name)
        if name != "model" and saved_type != type(obj).__name__:
            raise CheckpointError(
                f"{path} holds the state of a {saved_type}, cannot load it into a "
                f"{type(obj).__name__}: build the {name} as in the run that saved it."
            )
    if model is not None:
        check_model_state(model, payload["model"], strict)
    if optimizer is not None:
        check_optimizer_state(optimizer, payload["optimizer"])
    undo = _load_optimizer_and_scheduler(optimizer, scheduler, payload)
    if model is not None:  # last: its checks above are exact for torch's own modules
        try:
            model.load_state_dict(payload["model"], strict=strict)
        except Exception as err:  # a custom load hook refused what the checks accepted
            undo()
            raise CheckpointError(
                f"{type(model).__name__}.load_state_dict refused the checkpoint after graff's "
                f"checks passed (optimizer and scheduler restored; the model may be partly "
                f"loaded): {err}"
            ) from err
    return payload["extra"]


def read_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """The verified payload of a :func:`save_checkpoint` file, loading it into nothing.

    Raises:
        CheckpointError: if the file is missing, truncated, corrupt, not a graff checkpoint, of
            another format version, or holds objects that would run code when loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types on bad bytes: all mean "not readable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "weights only load failed" in str(err).lower():
            raise CheckpointError(
                f"{path} is corrupt or holds objects other than tensors and plain containers; "
                f"loading them would run code, so graff refuses (weights_only=True). {first_line}"
            ) from err
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or not a torch.save "
            f"file): {type(err).__name__}: {first_line}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a graff checkpoint (no format={CHECKPOINT_FORMAT!r} entry); a file "
            "you wrote with torch.save yourself loads with torch.load(path, weights_only=True)."
        )
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is graff checkpoint format version {payload.get('format_version')!r}; this "
            f"graff ({__version__}) reads version {CHECKPOINT_FORMAT_VERSION}."
        )
    missing = {"checksum", "types", "extra", *_PARTS} - set(payload)
    if missing or not isinstance(payload["types"], dict):
        raise CheckpointError(
            f"{path} is an incomplete graff checkpoint (missing {sorted(missing)})."
        )
    stored = payload.pop("checksum")
    try:
        actual = payload_digest(payload, data=stored is not None)
    except GraffTypeError as err:
        raise CheckpointError(f"{path} holds an unexpected value: {err}") from err
    if stored is not None and stored != actual:
        raise CheckpointError(
            f"{path} is corrupt: its content does not match its checksum (stored {stored!r})."
        )
    return payload


def _load_optimizer_and_scheduler(
    optimizer: torch.optim.Optimizer | None, scheduler: Any, payload: dict[str, Any]
) -> Callable[[], None]:
    """Load both, or neither; returns the function that puts both back as they were.

    Optimizer.load_state_dict replaces ``state`` and ``param_groups`` by new objects, so keeping
    the old ones is a free snapshot; the scheduler's is its ``state_dict()``.
    """
    old_opt = None if optimizer is None else (optimizer.state, optimizer.param_groups)
    old_sched = None if scheduler is None else scheduler.state_dict()

    def undo() -> None:
        if optimizer is not None and old_opt is not None:
            optimizer.state, optimizer.param_groups = old_opt
        if scheduler is not None and _changed(scheduler, old_sched):
            scheduler.load_state_dict(old_sched)

    try:
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(payload["scheduler"])
    except Exception as err:
        undo()  # the scheduler refused, possibly after changing part of itself
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"the checkpoint does not fit: {type(err).__name__}: {err}") from err
    return undo


def _changed(scheduler: Any, old_state: Any) -> bool:
    """Whether ``scheduler.state_dict()`` differs from ``old_state`` (True if undecidable)."""
    try:
        return payload_digest(_timeless(scheduler.state_dict())) != payload_digest(
            _timeless(old_state)
        )
    except Exception:
        return True


def _timeless(state: Any) -> Any:
    """A graff scheduler state without the clock readings that move on their own."""
    if isinstance(state, dict) and isinstance(state.get("budget"), dict):
        budget = {
            k: v
            for k, v in state["budget"].items()
            if k not in ("elapsed_seconds", "energy_joules")
        }
        return {**state, "budget": budget}
    return state
