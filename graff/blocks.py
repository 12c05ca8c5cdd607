"""Blocks: the groups of trainable parameters that are the planner's graph nodes.

By default a block is one LoRA-adapted module (its ``lora_A``/``lora_B``/... parameters) when the
model carries peft adapters; otherwise one block per optimizer parameter group. A user mapping
``{name: parameters}`` overrides both. Only parameters the optimizer updates are assigned;
trainable parameters outside every LoRA module (e.g. a trained head) form one extra block per
parameter group, so every updated parameter belongs to exactly one block.

Edges connect the modules of the same layer, and the same module in adjacent layers, parsed
from names such as ``...layers.3.self_attn.q_proj`` (Llama/Qwen/Mistral/GPT-2 ``h.3`` style).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from graff.errors import GraffConfigError, GraffTypeError

_LORA_PARAM = re.compile(
    r"^(?P<module>.+)\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\b"
)
_LAYER = re.compile(
    r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers|encoder\.layers)\.(?P<idx>\d+)\.(?P<rest>.+)$"
)


@dataclass(frozen=True, eq=False)
class Block:
    """A named group of parameters; ``layer``/``module`` are parsed from the name when possible."""

    name: str
    params: tuple[nn.Parameter, ...]
    layer: int | None = None
    module: str | None = None

    @property
    def numel(self) -> int:
        """Number of scalar parameters in the block."""
        return sum(p.numel() for p in self.params)


def _parse_layer(name: str) -> tuple[int | None, str | None]:
    match = _LAYER.search(name)
    if match is None:
        return None, None
    return int(match.group("idx")), match.group("rest")


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[tuple[int, nn.Parameter]]:
    seen: set[int] = set()
    out: list[tuple[int, nn.Parameter]] = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append((gi, p))
    return out


def _from_mapping(
    mapping: Mapping[str, Iterable[nn.Parameter]], in_optimizer: set[int]
) -> list[Block]:
    blocks, used = [], set()
    for name, params in mapping.items():
        plist = tuple(params)
        if not plist:
            raise GraffConfigError(f"block {name!r} in blocks= has no parameters.")
        for p in plist:
            if not isinstance(p, torch.Tensor):
                raise GraffTypeError(
                    f"block {name!r} holds {type(p).__name__}, expected parameters."
                )
            if id(p) not in in_optimizer:
                raise GraffConfigError(
                    f"block {name!r} holds a parameter the optimizer does not update."
                )
            if id(p) in used:
                raise GraffConfigError(f"a parameter of block {name!r} is also in another block.")
            used.add(id(p))
        layer, module = _parse_layer(name)
        blocks.append(Block(name, plist, layer, module))
    return blocks


def discover_blocks(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    blocks: Mapping[str, Iterable[nn.Parameter]] | None = None,
) -> list[Block]:
    """Split the optimizer's parameters into blocks (see module docstring for the rules).

    Args:
        optimizer: The optimizer whose parameters are planned for.
        model: Optional model; LoRA modules found in it become one block each.
        blocks: Optional user mapping ``{name: parameters}``; parameters of the optimizer not in
            any listed block form a remainder block per parameter group.

    Returns:
        The blocks, in a deterministic order (mapping order, then module order, then groups).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise GraffTypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    owned = _optimizer_params(optimizer)
    ids = {id(p) for _, p in owned}
    found: list[Block] = []
    if blocks is not None:
        found = _from_mapping(blocks, ids)
    elif model is not None:
        by_module: dict[str, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            match = _LORA_PARAM.match(name)
            if match and id(p) in ids:
                by_module.setdefault(match.group("module"), []).append(p)
        for module, plist in by_module.items():
            layer, rest = _parse_layer(module)
            found.append(Block(module, tuple(plist), layer, rest))
    assigned = {id(p) for b in found for p in b.params}
    remainder: dict[int, list[nn.Parameter]] = {}
    for gi, p in owned:
        if id(p) not in assigned:
            remainder.setdefault(gi, []).append(p)
    for gi, plist in remainder.items():
        found.append(Block(f"param_group.{gi}", tuple(plist)))
    if not found:
        raise GraffConfigError("the optimizer has no parameters: nothing to schedule.")
    return found


def block_edges(
    blocks: Sequence[Block], adjacency: Iterable[tuple[int, int]] | None = None
) -> torch.Tensor:
    """Directed edge list ``(2, E)`` (both directions) between blocks.

    With ``adjacency`` (pairs of block indices) those pairs are used. Otherwise blocks of the
    same layer are connected, and so is the same module in adjacent layers.
    """
    n = len(blocks)
    pairs: set[tuple[int, int]] = set()
    if adjacency is not None:
        for i, j in adjacency:
            if not (0 <= int(i) < n and 0 <= int(j) < n):
                raise GraffConfigError(f"adjacency pair ({i}, {j}) is out of range for {n} blocks.")
            if i != j:
                pairs.update({(int(i), int(j)), (int(j), int(i))})
    else:
        for i, a in enumerate(blocks):
            for j, b in enumerate(blocks):
                if i == j or a.layer is None or b.layer is None:
                    continue
                same_layer = a.layer == b.layer
                next_layer = abs(a.layer - b.layer) == 1 and a.module == b.module
                if same_layer or next_layer:
                    pairs.add((i, j))
    if not pairs:
        return torch.zeros(2, 0, dtype=torch.long)
    return torch.tensor(sorted(pairs), dtype=torch.long).t().contiguous()
