"""PlannerUpdate: the planner's online step equals torch's zero_grad/backward/clip/Adam.step."""

from __future__ import annotations

import copy

import pytest
import torch

from graff.planner.net import PlannerNet
from graff.planner.online import PlannerUpdate


def _objective(planner: PlannerNet, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, h = (
        torch.randn(5, planner.num_features, generator=g),
        torch.randn(5, planner.hidden, generator=g),
    )
    adjacency = torch.full((5, 5), 0.2)
    residual, logits = planner.decode(planner(x, h, adjacency))
    return scale * (residual + logits.sum()) ** 2


def _pair(**adam_kwargs):
    torch.manual_seed(0)
    a = PlannerNet()
    b = copy.deepcopy(a)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, **adam_kwargs)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2, **adam_kwargs)
    return a, opt_a, b, opt_b, PlannerUpdate(list(b.parameters()), b.encoder_parameters(), opt_b)


def _torch_step(planner: PlannerNet, opt: torch.optim.Adam, objective: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    objective.backward()
    torch.nn.utils.clip_grad_norm_(planner.parameters(), 1.0, foreach=True)
    opt.step()


def _assert_same(a, opt_a, b, opt_b) -> None:
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "adam_kwargs", [{"fused": True}, {"foreach": True}, {"foreach": False}, {"weight_decay": 0.1}]
)
def test_updates_are_bit_identical_to_torch_adam(adam_kwargs) -> None:
    a, opt_a, b, opt_b, update = _pair(**adam_kwargs)
    for step in range(6):  # the first step creates the state through Adam.step itself
        scale = 100.0 if step % 2 else 0.01  # clipped and unclipped gradients
        _torch_step(a, opt_a, _objective(a, step, scale))
        assert update.step(_objective(b, step, scale), max_norm=1.0)
        _assert_same(a, opt_a, b, opt_b)


def test_a_reloaded_optimizer_state_is_the_one_used() -> None:
    a, opt_a, b, opt_b, update = _pair(fused=True)
    for step in range(3):
        _torch_step(a, opt_a, _objective(a, step))
        update.step(_objective(b, step), max_norm=1.0)
    saved = copy.deepcopy(opt_b.state_dict())
    _torch_step(a, opt_a, _objective(a, 3))
    update.step(_objective(b, 3), max_norm=1.0)
    opt_b.load_state_dict(saved)  # new state tensors: the update must read them, not old ones
    b.load_state_dict(a.state_dict())
    opt_a.load_state_dict(saved)
    _torch_step(a, opt_a, _objective(a, 4))
    update.step(_objective(b, 4), max_norm=1.0)
    _assert_same(a, opt_a, b, opt_b)


def test_a_non_finite_gradient_takes_no_step_and_leaves_no_gradient() -> None:
    _, _, b, opt_b, update = _pair(fused=True)
    update.step(_objective(b, 0), max_norm=1.0)
    before = [p.detach().clone() for p in b.parameters()]
    moments = [opt_b.state[p]["exp_avg"].clone() for p in b.parameters()]
    assert not update.step(_objective(b, 1) * float("nan"), max_norm=1.0)
    assert all(p.grad is None for p in b.parameters())
    for p, old, m in zip(b.parameters(), before, moments, strict=True):
        assert torch.equal(p, old)
        assert torch.equal(opt_b.state[p]["exp_avg"], m)


def test_the_encoder_version_moves_with_an_in_place_edit_of_the_encoder_only() -> None:
    _, _, b, _, update = _pair()
    v = update.encoder_version()
    with torch.no_grad():
        b.lr_w.add_(1.0)  # the decoder
    assert update.encoder_version() == v
    with torch.no_grad():
        b.gru.weight_hh.mul_(0.5)
    assert update.encoder_version() != v


def test_without_a_usable_functional_adam_every_step_is_adam_step(monkeypatch) -> None:
    import graff.planner.online as module

    monkeypatch.setattr(module, "_FUNCTIONAL", False)  # an older torch's signature
    a, opt_a, b, opt_b, update = _pair(fused=True)
    for step in range(3):
        _torch_step(a, opt_a, _objective(a, step))
        assert update.step(_objective(b, step), max_norm=1.0)
        _assert_same(a, opt_a, b, opt_b)
