"""Tests of block discovery (the planner's graph nodes) and of the edges between blocks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from graff.blocks import Block, block_edges, discover_blocks
from graff.errors import GraffConfigError, GraffTypeError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
SUBMODULE = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
PREFIX = "base_model.model.model.layers"


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _edge_set(edges: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in edges.t().tolist()}


def _lora_blocks(model: nn.Module) -> list[Block]:
    opt = torch.optim.AdamW(_trainable(model), lr=1e-3)
    return discover_blocks(opt, model=model)


# ----------------------------------------------------------------------------- LoRA discovery
def test_lora_model_gives_one_block_per_adapted_module(tiny_lora_qwen3: nn.Module) -> None:
    blocks = _lora_blocks(tiny_lora_qwen3)
    expected = [f"{PREFIX}.{layer}.{SUBMODULE[t]}.{t}" for layer in (0, 1) for t in TARGETS]
    assert len(blocks) == 12
    assert sorted(b.name for b in blocks) == sorted(expected)


def test_lora_blocks_parse_layer_and_module(tiny_lora_qwen3: nn.Module) -> None:
    for block in _lora_blocks(tiny_lora_qwen3):
        target = block.name.rsplit(".", 1)[-1]
        layer = int(block.name.split("layers.")[1].split(".")[0])
        assert block.layer == layer
        assert block.module == f"{SUBMODULE[target]}.{target}"


def test_lora_blocks_hold_exactly_their_adapters(tiny_lora_qwen3: nn.Module) -> None:
    named = dict(tiny_lora_qwen3.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    blocks = _lora_blocks(tiny_lora_qwen3)
    for block in blocks:
        names = sorted(by_id[id(p)] for p in block.params)
        assert names == [
            f"{block.name}.lora_A.default.weight",
            f"{block.name}.lora_B.default.weight",
        ]
        assert block.numel == sum(named[n].numel() for n in names)
    covered = [id(p) for b in blocks for p in b.params]
    assert len(covered) == len(set(covered))
    assert set(covered) == {id(p) for p in _trainable(tiny_lora_qwen3)}


def test_trainable_non_lora_params_form_a_remainder_block(tiny_lora_qwen3: nn.Module) -> None:
    head = tiny_lora_qwen3.base_model.model.lm_head.weight
    head.requires_grad_(True)
    opt = torch.optim.AdamW(_trainable(tiny_lora_qwen3), lr=1e-3)
    blocks = discover_blocks(opt, model=tiny_lora_qwen3)
    assert len(blocks) == 13
    remainder = blocks[-1]
    assert remainder.name == "param_group.0"
    assert remainder.params == (head,)
    assert remainder.layer is None
    assert remainder.module is None


def test_remainder_blocks_follow_parameter_groups(tiny_lora_qwen3: nn.Module) -> None:
    base = tiny_lora_qwen3.base_model.model
    head, norm = base.lm_head.weight, base.model.norm.weight
    head.requires_grad_(True)
    norm.requires_grad_(True)
    lora = [p for n, p in tiny_lora_qwen3.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW([{"params": [*lora, norm]}, {"params": [head], "lr": 1e-4}], lr=1e-3)
    blocks = discover_blocks(opt, model=tiny_lora_qwen3)
    assert [b.name for b in blocks[-2:]] == ["param_group.0", "param_group.1"]
    assert blocks[-2].params == (norm,)
    assert blocks[-1].params == (head,)


def test_frozen_lora_params_outside_the_optimizer_are_skipped(tiny_lora_qwen3: nn.Module) -> None:
    layer0 = [p for n, p in tiny_lora_qwen3.named_parameters() if "lora_" in n and "layers.0." in n]
    opt = torch.optim.SGD(layer0, lr=0.1)
    blocks = discover_blocks(opt, model=tiny_lora_qwen3)
    assert len(blocks) == 6
    assert {b.layer for b in blocks} == {0}


# ----------------------------------------------------------------------------- plain optimizers
def test_plain_optimizer_gives_one_block_per_param_group() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}],
        lr=0.1,
    )
    blocks = discover_blocks(opt)
    assert [b.name for b in blocks] == ["param_group.0", "param_group.1"]
    assert blocks[0].params == tuple(model[0].parameters())
    assert blocks[1].params == tuple(model[2].parameters())
    assert [b.numel for b in blocks] == [3 * 4 + 4, 4 * 2 + 2]


def test_model_without_lora_falls_back_to_param_groups() -> None:
    model = nn.Linear(3, 2)
    blocks = discover_blocks(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    assert [b.name for b in blocks] == ["param_group.0"]


def test_non_optimizer_is_rejected() -> None:
    with pytest.raises(
        GraffTypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got list"
    ):
        discover_blocks([nn.Parameter(torch.zeros(1))])


# ----------------------------------------------------------------------------- user mapping
def _three_params() -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    params = [nn.Parameter(torch.zeros(k)) for k in (1, 2, 3)]
    return params, torch.optim.SGD(params, lr=0.1)


def test_user_mapping_defines_blocks_and_remainder() -> None:
    (a, b, c), opt = _three_params()
    blocks = discover_blocks(opt, blocks={"layers.0.attn": [a], "layers.1.attn": iter([b])})
    assert [blk.name for blk in blocks] == ["layers.0.attn", "layers.1.attn", "param_group.0"]
    assert [blk.params for blk in blocks] == [(a,), (b,), (c,)]
    assert [(blk.layer, blk.module) for blk in blocks] == [(0, "attn"), (1, "attn"), (None, None)]


def test_user_mapping_overrides_lora_discovery(tiny_lora_qwen3: nn.Module) -> None:
    params = _trainable(tiny_lora_qwen3)
    opt = torch.optim.AdamW(params, lr=1e-3)
    blocks = discover_blocks(opt, model=tiny_lora_qwen3, blocks={"all": params})
    assert [b.name for b in blocks] == ["all"]


def test_empty_user_block_is_rejected() -> None:
    _, opt = _three_params()
    with pytest.raises(GraffConfigError, match="block 'empty' in blocks= has no parameters"):
        discover_blocks(opt, blocks={"empty": []})


def test_foreign_parameter_is_rejected() -> None:
    _, opt = _three_params()
    stranger = nn.Parameter(torch.zeros(2))
    with pytest.raises(
        GraffConfigError, match="block 'x' holds a parameter the optimizer does not"
    ):
        discover_blocks(opt, blocks={"x": [stranger]})


def test_duplicated_parameter_is_rejected() -> None:
    (a, b, _), opt = _three_params()
    with pytest.raises(GraffConfigError, match="a parameter of block 'y' is also in another block"):
        discover_blocks(opt, blocks={"x": [a, b], "y": [b]})


def test_non_parameter_in_mapping_is_rejected() -> None:
    _, opt = _three_params()
    with pytest.raises(GraffTypeError, match="block 'x' holds str, expected parameters"):
        discover_blocks(opt, blocks={"x": ["weight"]})


# ----------------------------------------------------------------------------- edges
def test_default_edges_on_the_two_layer_lora_model(tiny_lora_qwen3: nn.Module) -> None:
    blocks = _lora_blocks(tiny_lora_qwen3)
    index = {(b.layer, b.name.rsplit(".", 1)[-1]): i for i, b in enumerate(blocks)}
    expected = set()
    for layer in (0, 1):  # every ordered pair of distinct modules within a layer
        for s, t in itertools.permutations(TARGETS, 2):
            expected.add((index[layer, s], index[layer, t]))
    for t in TARGETS:  # the same module in adjacent layers, both directions
        expected.add((index[0, t], index[1, t]))
        expected.add((index[1, t], index[0, t]))
    edges = block_edges(blocks)
    assert edges.dtype == torch.long
    assert edges.shape == (2, 2 * 15 * 2 + 2 * 6)
    assert _edge_set(edges) == expected


def test_default_edges_skip_non_adjacent_layers_and_other_modules() -> None:
    p = nn.Parameter(torch.zeros(1))
    blocks = [
        Block("layers.0.mlp", (p,), 0, "mlp"),
        Block("layers.2.mlp", (p,), 2, "mlp"),
        Block("layers.1.attn", (p,), 1, "attn"),
        Block("param_group.0", (p,)),
    ]
    assert block_edges(blocks).shape == (2, 0)


def test_remainder_block_has_no_default_edges(tiny_lora_qwen3: nn.Module) -> None:
    tiny_lora_qwen3.base_model.model.lm_head.weight.requires_grad_(True)
    opt = torch.optim.AdamW(_trainable(tiny_lora_qwen3), lr=1e-3)
    blocks = discover_blocks(opt, model=tiny_lora_qwen3)
    remainder = len(blocks) - 1
    assert all(remainder not in pair for pair in _edge_set(block_edges(blocks)))


def test_user_adjacency_is_symmetrised_and_drops_self_loops() -> None:
    p = nn.Parameter(torch.zeros(1))
    blocks = [Block(f"b{i}", (p,)) for i in range(4)]
    edges = block_edges(blocks, adjacency=[(0, 1), (2, 3), (3, 2), (1, 1)])
    assert _edge_set(edges) == {(0, 1), (1, 0), (2, 3), (3, 2)}
    assert edges.shape == (2, 4)


@pytest.mark.parametrize("pair", [(0, 4), (4, 0), (-1, 0), (0, 99)])
def test_user_adjacency_out_of_range_is_rejected(pair: tuple[int, int]) -> None:
    p = nn.Parameter(torch.zeros(1))
    blocks = [Block(f"b{i}", (p,)) for i in range(4)]
    with pytest.raises(GraffConfigError, match=r"adjacency pair .* is out of range for 4 blocks"):
        block_edges(blocks, adjacency=[pair])


def test_empty_adjacency_gives_no_edges() -> None:
    p = nn.Parameter(torch.zeros(1))
    edges = block_edges([Block("a", (p,)), Block("b", (p,))], adjacency=[])
    assert edges.shape == (2, 0)
    assert edges.dtype == torch.long


def test_edges_are_symmetric(tiny_lora_qwen3: nn.Module) -> None:
    pairs = _edge_set(block_edges(_lora_blocks(tiny_lora_qwen3)))
    assert pairs == {(j, i) for i, j in pairs}
    assert all(i != j for i, j in pairs)
