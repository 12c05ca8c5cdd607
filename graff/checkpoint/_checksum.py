"""A content checksum for checkpoint payloads: detects corrupt bytes that ``torch.load`` accepts.

``torch.load`` does not verify the CRC-32 of the records in a ``torch.save`` zip file: a flipped
byte inside a tensor's data, or in many places of the pickle, loads without error as *other*
values. :func:`payload_digest` hashes what a payload means rather than how it is encoded —
the nesting of dicts, lists and tuples, every key and scalar, a state dict's ``_metadata``, and
every tensor's dtype, shape, ``requires_grad`` and raw bytes — so a payload read back by
:func:`torch.load` whose digest equals the one computed before :func:`torch.save` is the saved
payload (short of a SHA-256 collision).

The walk accepts only the types that ``torch.load(..., weights_only=True)`` rebuilds without an
allow-list: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, tensors and
``nn.Parameter``, ``torch.Size``, ``torch.dtype``, ``torch.device``, and ``dict``,
``OrderedDict``, ``list``, ``tuple``, ``set`` and ``frozenset`` of those. Anything else raises
:class:`~graff.errors.GraffTypeError` naming where it sits, so a checkpoint that could not be
loaded safely is refused when it is *saved*, not discovered at resume time.

Only dense data is hashed byte for byte; a sparse tensor is hashed through its dense form, a
quantized one through its integer representation, a ``meta`` tensor by dtype and shape alone.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from graff.errors import GraffTypeError

ALGORITHM = "sha256"


def payload_digest(obj: Any, *, data: bool = True) -> str:
    """``"sha256:<hex>"`` of the canonical encoding of ``obj`` (see the module docstring).

    Args:
        obj: The payload.
        data: Hash the tensors' bytes; ``False`` only checks the types (fast).

    Raises:
        GraffTypeError: if ``obj`` holds a value ``weights_only`` loading cannot rebuild.
    """
    hasher = hashlib.new(ALGORITHM) if data else _NullHasher()
    _update(hasher, obj, "payload")
    return f"{ALGORITHM}:{hasher.hexdigest()}"


class _NullHasher:
    """Accepts and drops everything: the type check of :func:`payload_digest` without hashing."""

    def update(self, data: Any) -> None:
        return None

    def hexdigest(self) -> str:
        return ""


def _tag(hasher: Any, tag: bytes, text: str = "") -> None:
    data = text.encode("utf-8", "surrogatepass")
    hasher.update(tag + str(len(data)).encode() + b":" + data)


def _update(hasher: Any, obj: Any, where: str) -> None:  # noqa: C901 - one branch per type
    if obj is None:
        hasher.update(b"N")
    elif isinstance(obj, bool):
        hasher.update(b"B1" if obj else b"B0")
    elif type(obj) is int:
        _tag(hasher, b"I", str(obj))
    elif type(obj) is float:
        _tag(hasher, b"F", obj.hex())
    elif type(obj) is complex:
        _tag(hasher, b"C", f"{obj.real.hex()},{obj.imag.hex()}")
    elif type(obj) is str:
        _tag(hasher, b"S", obj)
    elif type(obj) is bytes:
        hasher.update(b"Y" + str(len(obj)).encode() + b":" + obj)
    elif isinstance(obj, Tensor):
        _update_tensor(hasher, obj, where)
    elif isinstance(obj, (torch.dtype, torch.device)):
        _tag(hasher, b"D", f"{type(obj).__name__}:{obj}")
    elif type(obj) is torch.Size:
        _tag(hasher, b"Z", ",".join(map(str, obj)))
    elif type(obj) in (dict, OrderedDict):
        _tag(hasher, b"M", str(len(obj)))
        for key, value in obj.items():
            _update(hasher, key, f"{where} key {key!r}")
            _update(hasher, value, f"{where}[{key!r}]")
        metadata = getattr(obj, "_metadata", None)  # module versions of a model state dict
        if metadata is not None:
            _update(hasher, metadata, f"{where}._metadata")
    elif type(obj) in (list, tuple):
        _tag(hasher, b"L" if type(obj) is list else b"T", str(len(obj)))
        for i, value in enumerate(obj):
            _update(hasher, value, f"{where}[{i}]")
    elif type(obj) in (set, frozenset):  # iteration order varies between processes: sort
        parts = sorted(payload_digest_part(v, f"{where} element") for v in obj)
        _tag(hasher, b"E", ",".join(parts))
    else:
        raise GraffTypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
            "torch.load(..., weights_only=True) cannot rebuild without running code. Store "
            "tensors, numbers, strings, None, and dicts/lists/tuples of them (e.g. convert numpy "
            "arrays with torch.from_numpy, dataclasses with dataclasses.asdict)."
        )


def payload_digest_part(obj: Any, where: str) -> str:
    """Hex digest of one value (used for the order-free encoding of sets)."""
    hasher = hashlib.new(ALGORITHM)
    _update(hasher, obj, where)
    return hasher.hexdigest()


def _update_tensor(hasher: Any, t: Tensor, where: str) -> None:
    if type(t) not in (Tensor, torch.nn.Parameter):
        raise GraffTypeError(
            f"{where} is a tensor subclass {type(t).__qualname__}, which weights_only loading "
            "cannot rebuild; save a plain tensor (e.g. tensor.full_tensor() for a DTensor)."
        )
    _tag(hasher, b"X", f"{t.dtype}|{tuple(t.shape)}|{t.layout}|{t.requires_grad}")
    t = t.detach()
    if isinstance(hasher, _NullHasher) or t.device.type == "meta" or t.numel() == 0:
        return
    if t.is_quantized:
        t = t.int_repr()
    elif t.layout != torch.strided:
        t = t.to_dense()
    data = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1).view(torch.uint8)
    hasher.update(data.numpy())
