"""Token weights from entropies and the weighted causal-LM loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_qwen3
from hypothesis import given, settings
from hypothesis import strategies as st

from graff.errors import GraffConfigError, GraffTypeError
from graff.tokens import token_weights_from_entropy, weighted_causal_lm_loss


def reference_weights(
    h: list[float], power: float, clip: tuple[float, float] | None, eps: float
) -> list[float]:
    """The formula of the docstring, term by term in Python floats."""
    r = [(x + eps) ** power for x in h]
    mean_r = sum(r) / len(r)
    rel = [x / mean_r for x in r]
    if clip is not None:
        rel = [min(max(x, clip[0]), clip[1]) for x in rel]
    mean_rel = sum(rel) / len(rel)
    return [x / mean_rel for x in rel]


# --- token_weights_from_entropy ------------------------------------------------------------------


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0, -1.0])
@pytest.mark.parametrize("clip", [(0.25, 4.0), (0.5, 1.5), None])
def test_weights_match_the_formula(power, clip) -> None:
    h = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) * 4
    got = token_weights_from_entropy(h, power=power, clip=clip)
    expected = reference_weights(h.reshape(-1).double().tolist(), power, clip, 1e-6)
    torch.testing.assert_close(
        got.reshape(-1).double(), torch.tensor(expected, dtype=torch.float64)
    )
    assert got.dtype == torch.float32
    assert got.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_clipping_hand_computed() -> None:
    # r / mean(r) = [1, 1, 1, 97] / 25 -> clip to [0.25, 4] -> [0.25, 0.25, 0.25, 3.88]
    h = torch.tensor([1.0, 1.0, 1.0, 97.0])
    got = token_weights_from_entropy(h, clip=(0.25, 4.0), eps=0.0)
    clipped = [0.25, 0.25, 0.25, 97 / 25]
    mean = sum(clipped) / 4
    torch.testing.assert_close(got, torch.tensor([c / mean for c in clipped]))
    assert (got.max() / got.min()).item() <= 4.0 / 0.25


def test_power_zero_gives_exact_ones() -> None:
    h = torch.tensor([[0.0, 1.0, 5.0], [2.0, 3.0, 0.1]])
    assert torch.equal(token_weights_from_entropy(h, power=0.0), torch.ones(2, 3))


def test_mask_zero_outside_mean_one_inside() -> None:
    h = torch.tensor([[1.0, 2.0, 3.0, math.nan], [4.0, 5.0, 6.0, math.inf]])
    mask = torch.isfinite(h)
    mask[1, 0] = False
    got = token_weights_from_entropy(h, mask=mask, eps=0.0, clip=None)
    assert bool((got[~mask] == 0).all())
    kept = [1.0, 2.0, 3.0, 5.0, 6.0]
    torch.testing.assert_close(got[mask], torch.tensor([x / (sum(kept) / 5) for x in kept]))
    assert torch.equal(
        token_weights_from_entropy(h, mask=torch.zeros_like(mask)), torch.zeros(2, 4)
    )


def test_extreme_power_stays_finite_and_positive() -> None:
    h = torch.tensor([0.0, 1e-3, 10.0, 1e4])
    for power in (-60.0, 60.0):
        got = token_weights_from_entropy(h, power=power)
        assert bool(torch.isfinite(got).all())
        assert bool((got > 0).all())
        assert got.mean().item() == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    h=st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=1, max_size=40),
    power=st.floats(min_value=-4.0, max_value=4.0),
    low=st.floats(min_value=0.01, max_value=1.0),
    high=st.floats(min_value=1.0, max_value=100.0),
)
def test_property_weights_finite_positive_mean_one(h, power, low, high) -> None:
    w = token_weights_from_entropy(torch.tensor(h), power=power, clip=(low, high))
    assert bool(torch.isfinite(w).all())
    assert bool((w > 0).all())
    assert w.double().mean().item() == pytest.approx(1.0, abs=1e-5)
    assert (w.max() / w.min()).item() <= high / low * (1 + 1e-5)


BAD_WEIGHT_ARGS = [
    (
        {"entropies": torch.tensor([1, 2])},
        GraffTypeError,
        "entropies must be a floating-point tensor",
    ),
    ({"power": math.nan}, GraffConfigError, "power must be finite, got nan"),
    ({"clip": (2.0, 3.0)}, GraffConfigError, r"0 < low <= 1 <= high .* got clip=\(2.0, 3.0\)"),
    ({"clip": (0.0, 3.0)}, GraffConfigError, r"clip\[0\] must be > 0, got 0.0"),
    ({"clip": (0.5,)}, GraffTypeError, r"clip must be a pair \(low, high\) or None"),
    ({"eps": -1.0}, GraffConfigError, "eps must be >= 0"),
    ({"eps": 0.0, "power": -1.0}, GraffConfigError, "> 0 when power < 0"),
    ({"mask": torch.ones(3)}, GraffTypeError, "mask must be a bool tensor"),
    (
        {"mask": torch.ones(2, dtype=torch.bool)},
        GraffConfigError,
        r"mask must have the shape of entropies \(3,\)",
    ),
    (
        {"entropies": torch.tensor([1.0, math.nan, 2.0])},
        GraffConfigError,
        "finite and >= 0 on mask",
    ),
    ({"entropies": torch.tensor([1.0, -0.5, 2.0])}, GraffConfigError, "finite and >= 0 on mask"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_WEIGHT_ARGS)
def test_weight_arguments_are_checked(kwargs, error, match) -> None:
    kwargs = dict(kwargs)
    entropies = kwargs.pop("entropies", torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(error, match=match):
        token_weights_from_entropy(entropies, **kwargs)


# --- weighted_causal_lm_loss ---------------------------------------------------------------------


def test_loss_equals_hugging_face_loss(token_batch) -> None:
    model = make_tiny_qwen3()
    labels = token_batch["labels"].clone()
    labels[0, :3] = -100
    labels[1, 7] = -100
    out = model(
        input_ids=token_batch["input_ids"],
        attention_mask=token_batch["attention_mask"],
        labels=labels,
    )
    ours = weighted_causal_lm_loss(out.logits, labels)
    uniform = weighted_causal_lm_loss(out.logits, labels, torch.ones(labels.shape))
    torch.testing.assert_close(ours, out.loss)
    torch.testing.assert_close(uniform, out.loss)


def test_two_token_example_by_hand() -> None:
    # sequence of 3 tokens -> 2 predictions; vocab of 2
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], requires_grad=True)
    labels = torch.tensor([[7, 0, 0]])  # labels[0, 0] is never a target
    weights = torch.tensor([[0.5, 1.5, math.nan]])  # the last position predicts nothing
    ce0 = math.log(math.exp(2.0) + 1.0) - 2.0  # position 0 predicts labels[0, 1] = 0
    ce1 = math.log(1.0 + math.exp(1.0)) - 0.0  # position 1 predicts labels[0, 2] = 0
    loss = weighted_causal_lm_loss(logits, labels, weights)
    assert loss.item() == pytest.approx((0.5 * ce0 + 1.5 * ce1) / 2)
    loss.backward()
    p0 = math.exp(2.0) / (math.exp(2.0) + 1.0)
    assert logits.grad[0, 0, 0].item() == pytest.approx(0.5 * (p0 - 1.0) / 2)
    assert torch.equal(logits.grad[0, 2], torch.zeros(2))


def test_ignored_targets_and_num_items() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, generator=g)
    labels = torch.randint(0, 6, (2, 5), generator=g)
    weights = torch.rand(2, 5, generator=g) + 0.5
    masked = labels.clone()
    masked[0, 2] = -100  # removes the prediction at position 1
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1), reduction="none"
    )
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = False
    w = weights[:, :-1].reshape(-1)
    expected = (per_token * w)[keep.reshape(-1)].sum() / keep.sum()
    torch.testing.assert_close(weighted_causal_lm_loss(logits, masked, weights), expected)
    torch.testing.assert_close(
        weighted_causal_lm_loss(logits, masked, weights, num_items_in_batch=20),
        expected * keep.sum() / 20,
    )


def test_all_ignored_gives_zero_with_gradient() -> None:
    logits = torch.randn(1, 4, 3, requires_grad=True)
    loss = weighted_causal_lm_loss(logits, torch.full((1, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(1, 4, 3))


def test_no_gradient_into_weights() -> None:
    logits = torch.randn(1, 4, 3, requires_grad=True)
    weights = torch.ones(1, 4, requires_grad=True)
    weighted_causal_lm_loss(logits, torch.tensor([[0, 1, 2, 0]]), weights).backward()
    assert weights.grad is None
    assert logits.grad is not None


@pytest.mark.parametrize(
    ("logits", "labels", "weights", "error", "match"),
    [
        (
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
            None,
            GraffConfigError,
            r"logits must be \[batch, seq, vocab\]",
        ),
        (
            torch.zeros(1, 4, 3),
            torch.zeros(1, 4),
            None,
            GraffTypeError,
            "labels must be an integer tensor",
        ),
        (
            torch.zeros(1, 4, 3),
            torch.zeros(1, 5, dtype=torch.long),
            None,
            GraffConfigError,
            r"labels must have shape \(1, 4\)",
        ),
        (
            torch.zeros(1, 4, 3),
            torch.zeros(1, 4, dtype=torch.long),
            torch.ones(4),
            GraffConfigError,
            "weights must have the shape",
        ),
    ],
)
def test_loss_arguments_are_checked(logits, labels, weights, error, match) -> None:
    with pytest.raises(error, match=match):
        weighted_causal_lm_loss(logits, labels, weights)
