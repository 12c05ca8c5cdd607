"""Token-aware loss weighting from per-token entropies (opt-in).

The entropy probe (:class:`graff.probes.entropy.EntropyProbe`) measures, for each token
position :math:`j`, the entropy :math:`H_j` of an early-layer logit-lens prediction. This module
turns those entropies into loss weights and applies them to the causal-LM loss, in the same
forward pass and before ``backward()``:

.. math::

    r_j = (H_j + \\varepsilon)^{p}, \\qquad
    \\tilde r_j = \\operatorname{clip}\\Bigl(\\frac{r_j}{\\bar r},\\ c_{lo},\\ c_{hi}\\Bigr), \\qquad
    w_j = \\frac{\\tilde r_j}{\\frac{1}{|M|}\\sum_{i\\in M}\\tilde r_i},

with :math:`p` = ``power``, :math:`(c_{lo}, c_{hi})` = ``clip``, :math:`\\varepsilon` = ``eps``,
:math:`M` the tokens selected by ``mask`` and :math:`\\bar r` the mean of :math:`r` over
:math:`M`. The weights average exactly one over :math:`M`, so the loss scale (and the learning
rate the schedulers plan) is unchanged; only the distribution of the loss over tokens moves.

Alignment: :func:`weighted_causal_lm_loss` shifts like Hugging Face's causal-LM loss, position
:math:`j` of ``logits`` predicts ``labels[j + 1]``. The weight at position :math:`j` (computed from
the entropy of the hidden state at position :math:`j`, i.e. of the prediction made *at*
:math:`j`) multiplies the loss of that prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from graff._checks import check_finite, check_positive
from graff.errors import GraffConfigError, GraffTypeError

__all__ = ["batch_token_weights", "token_weights_from_entropy", "weighted_causal_lm_loss"]


def _check_clip(clip: Sequence[float] | None) -> tuple[float, float] | None:
    if clip is None:
        return None
    if not isinstance(clip, Sequence) or isinstance(clip, str) or len(clip) != 2:
        raise GraffTypeError(f"clip must be a pair (low, high) or None, got {clip!r}.")
    low, high = check_positive("clip[0]", clip[0]), check_finite("clip[1]", clip[1])
    if not low <= 1.0 <= high:
        raise GraffConfigError(
            f"clip must satisfy 0 < low <= 1 <= high (bounds relative to the mean weight), "
            f"got clip={tuple(clip)!r}."
        )
    return low, high


def token_weights_from_entropy(
    entropies: Tensor,
    *,
    power: float = 1.0,
    clip: Sequence[float] | None = (0.25, 4.0),
    mask: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Per-token loss weights :math:`w_j \\propto (H_j + \\varepsilon)^p`, averaging one.

    .. math::

        w_j = \\frac{\\tilde r_j}{\\operatorname{mean}_{i \\in M} \\tilde r_i},\\quad
        \\tilde r_j = \\operatorname{clip}\\bigl(r_j / \\operatorname{mean}_{i\\in M} r_i,\\
        c_{lo}, c_{hi}\\bigr),\\quad r_j = (H_j + \\varepsilon)^p,

    where :math:`H_j` = ``entropies``, :math:`p` = ``power``, :math:`(c_{lo}, c_{hi})` = ``clip``,
    :math:`\\varepsilon` = ``eps`` and :math:`M` = ``mask``. The powers are computed in float64
    in log space, so any finite ``power`` (also negative: up-weight confident tokens) gives
    finite weights. Clipping happens before the final normalisation, so afterwards the weights
    may exceed ``clip`` by the renormalisation factor, but ``max(w) / min(w) <= high / low``
    holds exactly.

    Args:
        entropies: Non-negative entropies in nats, any shape (e.g. ``[batch, seq]``). Tiny
            negative values from rounding are treated as 0.
        power: Exponent :math:`p`, any finite real. ``0`` gives all ones on ``mask``.
        clip: ``(low, high)`` bounds on :math:`r_j/\\bar r` with ``0 < low <= 1 <= high``, or
            ``None`` for no clipping (then weights can underflow to 0 for extreme ``power``).
        mask: Boolean tensor of the shape of ``entropies``; ``True`` marks tokens that are
            weighted (e.g. non-padding positions whose target is not ignored). ``None`` means
            all tokens.
        eps: :math:`\\varepsilon > 0`, keeps :math:`H_j = 0` finite for negative ``power``.

    Returns:
        Float32 weights of the shape of ``entropies`` (no gradient), positive on ``mask`` with
        mean 1 there (up to float32 rounding), 0 outside it. All zeros if ``mask`` is empty.

    Raises:
        GraffTypeError: if ``entropies`` or ``mask`` is not a tensor of the right kind, or
            ``clip`` is not a pair.
        GraffConfigError: if ``power``/``eps``/``clip`` are out of range, shapes differ, or a
            masked entropy is NaN, infinite or clearly negative.

    Examples:
        >>> token_weights_from_entropy(torch.tensor([1.0, 3.0]), power=1.0, eps=0.0)
        tensor([0.5000, 1.5000])
        >>> token_weights_from_entropy(torch.tensor([1.0, 3.0]), power=0.0)
        tensor([1., 1.])
    """
    if not isinstance(entropies, Tensor) or not entropies.is_floating_point():
        raise GraffTypeError(f"entropies must be a floating-point tensor, got {entropies!r:.80}.")
    power = check_finite("power", power)
    eps_value = check_finite("eps", eps)
    if eps_value < 0.0 or (eps_value == 0.0 and power < 0.0):
        raise GraffConfigError(f"eps must be >= 0 (and > 0 when power < 0), got eps={eps!r}.")
    bounds = _check_clip(clip)
    if mask is None:
        mask = torch.ones_like(entropies, dtype=torch.bool)
    elif not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise GraffTypeError(f"mask must be a bool tensor or None, got {mask!r:.80}.")
    if mask.shape != entropies.shape:
        raise GraffConfigError(
            f"mask must have the shape of entropies {tuple(entropies.shape)}, got {tuple(mask.shape)}."
        )
    h = entropies.detach().to(torch.float64)[mask]
    if not bool(torch.isfinite(h).all()) or bool((h < -1e-4).any()):
        raise GraffConfigError(
            "entropies must be finite and >= 0 on mask; drop NaN/inf tokens from mask first "
            f"(got min={h.min().item() if h.numel() else None!r})."
        )
    out = torch.zeros(entropies.shape, dtype=torch.float32, device=entropies.device)
    if h.numel() == 0:
        return out
    log_r = power * torch.log(h.clamp_min(0.0) + eps_value)
    r = torch.exp(log_r - log_r.max())  # in (0, 1], max is exactly 1: the mean is > 0
    r = r / r.mean()
    if bounds is not None:
        r = r.clamp(bounds[0], bounds[1])
    out[mask] = (r / r.mean()).to(torch.float32)
    return out


def batch_token_weights(
    entropies: Tensor,
    token_index: Tensor,
    dropped_index: Tensor,
    shape: tuple[int, ...],
    labels: Tensor | None = None,
    *,
    ignore_index: int = -100,
    power: float = 1.0,
    clip: tuple[float, float] | None = (0.25, 4.0),
    eps: float = 1e-6,
) -> Tensor:
    """``[batch, seq]`` loss weights from the entropies of a batch's tokens at flat positions.

    What :meth:`graff.probes.entropy.EntropyProbe.token_weights` returns. Weights follow
    :func:`token_weights_from_entropy` on the positions that carry loss: positions ``j`` in
    ``token_index`` whose target ``labels[:, j + 1]`` is not ``ignore_index`` (all of them but
    the last of each row if ``labels`` is ``None``). On those they average 1; the positions in
    ``dropped_index`` (entropy NaN/inf) get weight 1; the others (padding) and positions without
    a target get 0.

    Args:
        entropies: Float32 ``[k]`` finite entropies of the tokens at ``token_index``.
        token_index: Long ``[k]`` flat positions in ``batch * seq``.
        dropped_index: Long flat positions whose entropy was dropped.
        shape: ``(batch, seq)`` of the forward.
        labels: ``[batch, seq]`` labels of the forward (unshifted), or ``None``.
        ignore_index: Label value without loss.
        power: Exponent of the entropy, see :func:`token_weights_from_entropy`.
        clip: Bounds relative to the mean weight, or ``None``.
        eps: Added to the entropy before the power.

    Returns:
        Float32 weights of shape ``shape`` on the device of ``entropies``.

    Raises:
        GraffConfigError: if ``labels`` does not have the shape ``shape``.
    """
    n, device = math.prod(shape), entropies.device
    ent = torch.zeros(n, dtype=torch.float32, device=device)
    ent[token_index] = entropies
    seen = torch.zeros(n, dtype=torch.bool, device=device)
    seen[token_index] = True
    dropped = torch.zeros_like(seen)
    dropped[dropped_index] = True
    target = torch.ones(shape, dtype=torch.bool, device=device)
    if labels is not None:
        if tuple(labels.shape) != shape:
            raise GraffConfigError(
                f"labels must have the shape {shape} of the last forward, got {tuple(labels.shape)}."
            )
        target[:, :-1] = labels[:, 1:].to(device) != ignore_index
    target[:, -1] = False
    target = target.reshape(-1)
    weights = token_weights_from_entropy(ent, power=power, clip=clip, mask=seen & target, eps=eps)
    weights[dropped & target] = 1.0
    return weights.reshape(shape)


def weighted_causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Shifted causal-LM cross entropy with optional per-token weights.

    .. math::

        L = \\frac{1}{N} \\sum_{b}\\sum_{j:\\ y_{b,j+1} \\ne \\text{ignore}}
        w_{b,j}\\,\\bigl(-\\log \\operatorname{softmax}(z_{b,j})_{y_{b,j+1}}\\bigr),

    with :math:`z` = ``logits``, :math:`y` = ``labels``, :math:`w` = ``weights`` (1 if ``None``)
    and :math:`N` the number of non-ignored targets (or ``num_items_in_batch``). Position
    :math:`j` predicts ``labels[:, j + 1]``, exactly as in Hugging Face's ``ForCausalLMLoss``; with
    ``weights=None`` the result equals ``model(..., labels=labels).loss``. The weight at
    position :math:`j` scales the prediction made *at* :math:`j` (for the entropy probe: the
    entropy of the hidden state at :math:`j`); ``weights[:, -1]`` is unused. Weights are
    detached: no gradient flows into them.

    Args:
        logits: ``[batch, seq, vocab]`` (any float dtype; computed in float32).
        labels: ``[batch, seq]`` integer token ids, ``ignore_index`` for positions without loss.
            Not shifted by the caller.
        weights: ``[batch, seq]`` non-negative weights or ``None``. Use
            :func:`token_weights_from_entropy` with a mask of the predicting positions so they
            average 1 and the loss scale is unchanged.
        ignore_index: Label value that contributes no loss.
        num_items_in_batch: Denominator :math:`N` across gradient-accumulation micro-batches,
            as in Hugging Face; ``None`` uses this batch's count of non-ignored targets.

    Returns:
        A 0-d float32 loss. 0 (not NaN, unlike Hugging Face) if every target is ignored.

    Raises:
        GraffTypeError: if ``labels`` is not an integer tensor.
        GraffConfigError: if shapes do not match.

    Examples:
        >>> logits = torch.zeros(1, 3, 4)
        >>> labels = torch.tensor([[0, 1, 2]])
        >>> round(weighted_causal_lm_loss(logits, labels).item(), 4)  # log(4)
        1.3863
    """
    if logits.dim() != 3:
        raise GraffConfigError(
            f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise GraffTypeError(f"labels must be an integer tensor, got dtype {labels.dtype}.")
    if labels.shape != logits.shape[:2]:
        raise GraffConfigError(
            f"labels must have shape {tuple(logits.shape[:2])} (logits without vocab), "
            f"got {tuple(labels.shape)}."
        )
    if weights is not None and weights.shape != labels.shape:
        raise GraffConfigError(
            f"weights must have the shape of labels {tuple(labels.shape)}, got {tuple(weights.shape)}."
        )
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    per_token = F.cross_entropy(
        logits.float().flatten(0, 1),
        shift_labels.flatten().to(logits.device),
        ignore_index=ignore_index,
        reduction="none",
    )
    valid = (shift_labels != ignore_index).flatten().to(per_token.device)
    if weights is not None:  # where(): a NaN weight on an ignored position must not leak in
        per_token = torch.where(valid, per_token * weights.detach().to(per_token).flatten(), 0.0)
    if num_items_in_batch is None:
        count = valid.sum().clamp_min(1)
    else:
        count = num_items_in_batch
    return per_token.sum() / count
