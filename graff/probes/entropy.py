"""Logit entropy after an early decoder layer (logit lens), read by a forward hook.

The probe decodes the hidden state :math:`h_j^{(\\ell)}` of token :math:`j` after decoder layer
:math:`\\ell` (``layer_index``; 0 is the first, "adapter", layer) with the model's own final norm
and LM head, the *logit lens* (nostalgebraist, "interpreting GPT: the logit lens", LessWrong,
2020; Belrose et al., "Eliciting Latent Predictions from Transformers with the Tuned Lens",
https://arxiv.org/abs/2303.08112, 2023), and records the entropy of that prediction:

.. math::

    z_j = W_U\\,\\operatorname{norm}(h_j^{(\\ell)}),\\qquad
    \\log p_j = \\operatorname{log\\_softmax}(z_j),\\qquad
    H_j = -\\sum_{v=1}^{V} p_{j,v} \\log p_{j,v} \\in [0, \\log V],

where :math:`W_U` is ``lm_head`` (or ``head=``), :math:`V` the vocabulary size, and
:math:`\\log p` is computed in float32 whatever the model's dtype. Only a random subset of at most
``max_tokens`` non-padding tokens goes through norm and head, under ``torch.no_grad`` on a
detached hidden state, so the model's outputs and gradients are untouched. Its statistics
(:meth:`EntropyProbe.stats`) are node features for the planners; its per-token entropies
(``max_tokens=None``) give opt-in loss weights (:meth:`EntropyProbe.token_weights`,
:mod:`graff.tokens`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from graff._checks import check_positive_int
from graff._hooks import HookSet, hook_state, restore_hooks
from graff._seeding import stream_seed
from graff._warn import warn
from graff.distributed import unwrap_data_parallel
from graff.errors import (
    GraffConfigError,
    GraffTypeError,
    ProbeError,
    ProbeWarning,
)
from graff.probes._context import in_backward, probing, reads_pass
from graff.probes._lens import entropy_from_logits, resolve_layer_and_head
from graff.probes._state import ENTROPY_FORMAT_VERSION, check_entropy_state
from graff.probes.stats import EntropyStats
from graff.tokens import batch_token_weights

__all__ = ["EntropyProbe", "EntropyStats", "entropy_from_logits"]

_CHUNK_ELEMENTS = 1 << 24  # at most this many float32 logits alive at once (64 MiB)


class EntropyProbe:
    """Forward hook recording the logit-lens entropy of sampled tokens after an early layer.

    On every forward pass of ``model`` (outside :func:`graff.probes._context.probing`; with
    ``training_only``, only those run with gradients enabled), after
    decoder layer ``layer_index`` runs, the probe draws at most ``max_tokens`` non-padding token
    positions, decodes their detached hidden states through the final norm and the LM head and
    stores the entropies :math:`H_j = -\\sum_v p_{j,v}\\log p_{j,v}` (float32, nats; see the module
    docstring for the logit-lens formula). The hooks return ``None`` and run under
    ``torch.no_grad`` without touching the global RNG, so the model's outputs and gradients are
    bitwise those without the probe.

    Hugging Face causal LMs are detected, also inside peft wrappers: Llama/Qwen/Mistral style
    (``model.layers``, ``model.norm``, ``lm_head``) and GPT-2 style (``transformer.h``,
    ``transformer.ln_f``, ``lm_head``). For anything else pass ``layer=`` and ``head=``.
    Padding is excluded when the forward is called with an ``attention_mask=`` keyword.
    Subsets are drawn from a private generator seeded by ``(seed, call count)``: two runs with
    one seed sample the same tokens, and :meth:`state_dict` resumes the sequence.

    Args:
        model: The module whose forward calls are observed (a causal LM or its peft wrapper).
        layer: Module whose output is the hidden state (a tensor or a tuple whose element 0 is
            the ``[batch, seq, hidden]`` tensor). ``None``: decoder layer ``layer_index``.
        head: Callable ``hidden -> logits`` (``[k, hidden] -> [k, vocab]``). ``None``: the model's
            final norm followed by its ``lm_head``.
        layer_index: Which decoder layer to hook when ``layer`` is ``None``; 0 is the first.
        max_tokens: Most token positions decoded per forward; ``None`` decodes all non-padding
            tokens (needed for :meth:`token_weights`).
        seed: Seed of the subset sampling, a non-negative integer.
        every: Decode every ``every``-th observed forward pass (call count ``0, every, …``);
            the others are only counted and leave the last readings in place. ``1`` decodes
            each one. Subsampling passes keeps the readings an unbiased sample of the tokens.
        training_only: Observe only forward passes run with gradients enabled, i.e. training
            passes: an evaluation under ``torch.no_grad()`` or ``torch.inference_mode()`` is
            then neither counted nor decoded, so evaluating between steps cannot change which
            training passes are read, nor a schedule built on them. The schedulers build their
            probes this way; the default (``False``) reads every pass, evaluation included.

    Attributes:
        entropies: Float32 tensor ``[k]`` of the finite entropies of the last forward (``None``
            before the first one).
        token_index: Long tensor ``[k]`` of their flat positions in ``batch * seq``, ascending.
        dropped_samples: Number of NaN/inf entropies dropped since construction.

    Raises:
        GraffTypeError: if ``model``/``layer`` is not an ``nn.Module``, ``head`` is not
            callable, or an integer argument is not an integer.
        GraffConfigError: if ``layer_index``/``max_tokens``/``seed`` is out of range.
        ProbeError: if no decoder layer or LM head can be found; pass ``layer=``/``head=``.

    Examples:
        Hugging Face causal LMs (also peft-wrapped) need only the model:
        ``probe = EntropyProbe(model, max_tokens=64)``. Any other model names layer and head:

        >>> lin, head = nn.Linear(8, 8), nn.Linear(8, 10)
        >>> model = nn.Sequential(nn.Embedding(10, 8), lin, head)
        >>> probe = EntropyProbe(model, layer=lin, head=head, max_tokens=4)
        >>> _ = model(torch.randint(0, 10, (2, 6)))
        >>> probe.entropies.shape, probe.stats().count
        (torch.Size([4]), 4)
        >>> probe.remove()

    References:
        nostalgebraist, "interpreting GPT: the logit lens", LessWrong, 2020.
        Belrose et al., "Eliciting Latent Predictions from Transformers with the Tuned Lens",
        https://arxiv.org/abs/2303.08112, 2023.
    """

    #: Class default, so a probe pickled before the argument existed reads as before.
    training_only: bool = False

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: nn.Module | None = None,
        head: Callable[[Tensor], Tensor] | None = None,
        layer_index: int = 0,
        max_tokens: int | None = 64,
        seed: int = 0,
        every: int = 1,
        training_only: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GraffTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        model = unwrap_data_parallel(model)  # DDP: hook the module it wraps
        if layer is not None and not isinstance(layer, nn.Module):
            raise GraffTypeError(
                f"layer must be a torch.nn.Module or None, got {type(layer).__name__}."
            )
        if head is not None and not callable(head):
            raise GraffTypeError(f"head must be a callable hidden -> logits or None, got {head!r}.")
        for name, value in (("layer_index", layer_index), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise GraffTypeError(f"{name} must be an int, got {value!r}.")
            if value < 0:
                raise GraffConfigError(f"{name} must be >= 0, got {value!r}.")
        if layer is not None and layer_index != 0:
            raise GraffConfigError(
                f"layer_index={layer_index!r} is only used without layer=; pass one of them."
            )
        self.max_tokens = (
            None if max_tokens is None else check_positive_int("max_tokens", max_tokens)
        )
        self.every = check_positive_int("every", every)
        if not isinstance(training_only, bool):
            raise GraffTypeError(f"training_only must be a bool, got {training_only!r}.")
        self.training_only = training_only
        self.seed = seed
        layer, self._head = resolve_layer_and_head(model, layer, head, layer_index)
        self.entropies: Tensor | None = None
        self.token_index: Tensor | None = None
        self._dropped_index: Tensor | None = None
        self._shape: tuple[int, ...] | None = None
        self._vocab: int | None = None
        self._mask: Tensor | None = None
        self._positions: Tensor | None = None  # cached arange of the last unmasked input size
        self._generator = torch.Generator()  # reseeded per call from (seed, call count)
        self._mean: tuple[Tensor, float] | None = None  # (entropies, their mean) cache
        self._calls = 0
        #: Seconds spent decoding sampled passes so far (not saved: a timing, not a state).
        self.overhead_seconds = 0.0
        #: ``calls`` right after the last decoded forward pass (None before one, and after a
        #: resume until the next one): with ``every > 1`` it tells fresh readings from stale.
        self.decoded_pass: int | None = None
        self._dropped = 0
        self._pooled: tuple[int, EntropyStats] | None = None  # all ranks' stats (distributed)
        self._model, self._layer = model, layer
        self._hooks = HookSet(self)
        self._register_hooks()

    def _register_hooks(self) -> None:
        """Hook the model and the layer. The hooks hold the probe weakly (:mod:`graff._hooks`):
        the model never keeps a forgotten probe alive, and they go when it is collected. A copy
        (``deepcopy``, pickle) hooks the model it holds instead of the original's."""
        hooks, model = self._hooks, self._model
        hooks.add_module_hook(model, "forward_pre", "_on_pre", with_kwargs=True)
        hooks.add_module_hook(model, "forward", "_on_post", always_call=True)
        hooks.add_module_hook(self._layer, "forward", "_on_layer")

    def __getstate__(self) -> dict[str, Any]:
        return hook_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        restore_hooks(self, state)

    def _on_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if reads_pass(self.training_only):
            mask = kwargs.get("attention_mask")
            self._mask = mask if isinstance(mask, Tensor) else None

    def _on_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if reads_pass(self.training_only):
            self._mask = None

    def _on_layer(self, module: nn.Module, args: Any, output: Any) -> None:
        if reads_pass(self.training_only) and not in_backward():
            self._observe(output)

    @property
    def calls(self) -> int:
        """Number of forward passes observed (the sampling generator's step)."""
        return self._calls

    @property
    def dropped_samples(self) -> int:
        """Number of sampled tokens whose entropy was NaN or infinite (not in ``entropies``)."""
        return self._dropped

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size ``V`` of the head's logits (``None`` before the first forward)."""
        return self._vocab

    @property
    def active(self) -> bool:
        """Whether the hooks are still attached (``False`` after :meth:`remove`)."""
        return self._hooks.active

    def remove(self) -> None:
        """Detach every hook from the model. Idempotent; the last readings stay readable."""
        self._hooks.remove()

    def _valid_positions(self, shape: tuple[int, ...]) -> Tensor:
        """Flat indices (CPU, long) of the non-padding tokens of a ``shape = [batch, seq]`` input."""
        n, mask = math.prod(shape), self._mask
        if mask is None:
            if self._positions is None or self._positions.numel() != n:
                self._positions = torch.arange(n)
            return self._positions
        if (
            len(shape) == 2
            and mask.dim() == 2
            and mask.shape[0] == shape[0]
            and mask.shape[1] >= shape[1]
        ):
            keep = (
                mask[:, mask.shape[1] - shape[1] :].reshape(-1) != 0
            )  # KV cache: last seq columns
            return keep.nonzero().squeeze(1).cpu()
        warn(
            f"EntropyProbe: attention_mask of shape {tuple(mask.shape)} does not match hidden "
            f"states of shape {shape}; sampling from all tokens, padding included. To silence: "
            "warnings.filterwarnings('ignore', category=graff.errors.ProbeWarning).",
            ProbeWarning,
        )
        return torch.arange(n)

    def _sample(self, valid: Tensor) -> Tensor:
        if self.max_tokens is None or valid.numel() <= self.max_tokens:
            return valid
        gen = self._generator.manual_seed(stream_seed(self.seed, self._calls))
        pick = torch.randperm(valid.numel(), generator=gen)[: self.max_tokens].sort().values
        return pick if valid is self._positions else valid[pick]

    def _observe(self, output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(hidden, Tensor) or hidden.dim() < 2 or not hidden.is_floating_point():
            raise ProbeError(
                "EntropyProbe: the hooked layer must return a float tensor [..., hidden] or a tuple "
                f"starting with one, got {type(hidden).__name__}. Pass layer= explicitly."
            )
        if self._calls % self.every:
            self._calls += 1
            return
        t0 = time.perf_counter()
        try:
            self._decode(hidden)
        finally:
            self.overhead_seconds += time.perf_counter() - t0

    def _decode(self, hidden: Tensor) -> None:
        """The logit lens on a sampled forward pass: entropies of a subset of its tokens."""
        shape = tuple(hidden.shape[:-1])
        index = self._sample(self._valid_positions(shape))
        if index.device != hidden.device:
            index = index.to(hidden.device)
        self._calls += 1
        self.decoded_pass = self._calls  # readers can tell a fresh pass from a stale one
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        parts, start = [], 0
        with torch.no_grad(), probing():
            while start < index.numel():  # chunks of bounded size; one row until vocab is known
                rows = max(1, _CHUNK_ELEMENTS // self._vocab) if self._vocab else 1
                chunk = (
                    index if start == 0 and rows >= index.numel() else index[start : start + rows]
                )
                logits = self._head(flat.index_select(0, chunk))
                self._vocab = int(logits.shape[-1])
                parts.append(entropy_from_logits(logits).reshape(-1))
                start += rows
        if len(parts) == 1:
            ent = parts[0]
        else:
            ent = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
        total = float(ent.sum(dtype=torch.float64)) if ent.numel() else 0.0
        if math.isfinite(total):  # the usual case (finite iff every term is): no mask copies
            self.entropies, self.token_index = ent, index
            self._dropped_index, self._shape = index[:0], shape
            self._mean = (ent, total / ent.numel()) if ent.numel() else None
            return
        finite = torch.isfinite(ent)
        self._dropped += int((~finite).sum())
        self.entropies, self.token_index = ent[finite], index[finite]
        self._dropped_index, self._shape = index[~finite], shape

    def mean_entropy(self) -> float | None:
        """Mean sampled entropy of the last forward (nats), or ``None`` without a finite sample.

        The cheap part of :meth:`stats` (one reduction): what GraffScheduler reads every step.
        """
        if self._pooled is not None and self._pooled[0] == self._calls:  # all ranks' samples
            pooled = self._pooled[1]
            return pooled.mean if pooled.count > 0 else None
        ent = self.entropies
        if ent is None or ent.numel() == 0:
            return None
        if self._mean is None or self._mean[0] is not ent:  # once per decoded pass
            self._mean = (ent, float(ent.double().mean()))
        return self._mean[1]

    def stats(self) -> EntropyStats:
        """Mean, std (population), min, max, count and ``mean / log(vocab)`` of the last forward.

        Under ``torch.distributed``, once a graff scheduler has stepped after that forward, the
        statistics pooled over every rank's samples (``min``/``max`` stay this rank's; see
        :mod:`graff.distributed`).

        Returns:
            An :class:`EntropyStats` of Python numbers, never NaN: all zeros with ``count=0``
            before the first forward or if every sample was dropped.
        """
        if self._pooled is not None and self._pooled[0] == self._calls:
            return self._pooled[1]
        return self._local_stats()

    def sufficient_statistics(self) -> list[float]:
        """``[Σ H, Σ H², n, log V, 1 if V is known]`` of the last forward's samples.

        Sums add over ranks: a scheduler all-reduces them once per step and hands the totals to
        :meth:`set_pooled`, so every rank's planner reads the statistics of all ranks' samples.
        """
        ent, vocab = self.entropies, self.vocab_size
        if ent is None or ent.numel() == 0:
            s = q = n = 0.0
        else:
            e = ent.double()
            s, q, n = float(e.sum()), float(e.pow(2).sum()), float(e.numel())
        log_v = math.log(vocab) if vocab and vocab > 1 else 0.0
        return [s, q, n, log_v, 1.0 if log_v > 0 else 0.0]

    def set_pooled(self, sums: Sequence[float]) -> None:
        """Adopt all ranks' summed :meth:`sufficient_statistics` for the last forward.

        :meth:`stats` then gives the pooled mean and (population) std; ``min``/``max`` stay this
        rank's (no planner reads them).
        """
        s, q, n, log_v_sum, n_v = sums
        if n <= 0:
            stats = EntropyStats(0.0, 0.0, 0.0, 0.0, 0, 0.0)
        else:
            local = self._local_stats()
            mean = s / n
            log_v = log_v_sum / n_v if n_v > 0 else 0.0
            stats = EntropyStats(
                mean=mean,
                std=math.sqrt(max(q / n - mean * mean, 0.0)),
                min=local.min,
                max=local.max,
                count=round(n),
                normalized_mean=mean / log_v if log_v > 0 else 0.0,
            )
        self._pooled = (self._calls, stats)

    def _local_stats(self) -> EntropyStats:
        ent = self.entropies
        if ent is None or ent.numel() == 0:
            return EntropyStats(0.0, 0.0, 0.0, 0.0, 0, 0.0)
        e = ent.double()
        mean = float(e.mean())
        log_v = math.log(self._vocab) if self._vocab and self._vocab > 1 else 0.0
        return EntropyStats(
            mean=mean,
            std=float(e.std(unbiased=False)),
            min=float(e.min()),
            max=float(e.max()),
            count=int(e.numel()),
            normalized_mean=mean / log_v if log_v > 0 else 0.0,
        )

    def token_weights(
        self,
        labels: Tensor | None = None,
        *,
        ignore_index: int = -100,
        power: float = 1.0,
        clip: tuple[float, float] | None = (0.25, 4.0),
        eps: float = 1e-6,
    ) -> Tensor:
        """``[batch, seq]`` loss weights from the last forward's entropies, for the same batch.

        Call after the forward and before ``backward()``, then pass the result to
        :func:`graff.tokens.weighted_causal_lm_loss`. The weights are those of
        :func:`graff.tokens.batch_token_weights`: they average 1 on the non-padding positions
        whose target is not ``ignore_index``; dropped entropies (NaN/inf) get weight 1; padding
        and positions without a target get 0.

        Args:
            labels: ``[batch, seq]`` labels of the forward (unshifted), or ``None``.
            ignore_index: Label value without loss.
            power: Exponent of the entropy, see :func:`~graff.tokens.token_weights_from_entropy`.
            clip: Bounds relative to the mean weight, or ``None``.
            eps: Added to the entropy before the power.

        Returns:
            Float32 weights ``[batch, seq]`` on the device of the entropies.

        Raises:
            ProbeError: before the first forward, or if the probe samples (``max_tokens`` set).
            GraffConfigError: if ``labels`` does not have the ``[batch, seq]`` shape of the forward.
        """
        self._check_every_token_seen()
        return batch_token_weights(
            self.entropies,
            self.token_index,
            self._dropped_index,
            self._shape,
            labels,
            ignore_index=ignore_index,
            power=power,
            clip=clip,
            eps=eps,
        )

    def _check_every_token_seen(self) -> None:
        """Raise ProbeError unless the last forward's entropies cover every token of a 2-d input."""
        if self.every != 1:
            raise ProbeError(
                f"token_weights needs the entropies of this very forward pass, but every={self.every}; "
                "construct the probe with every=1."
            )
        if self.max_tokens is not None:
            raise ProbeError(
                f"token_weights needs the entropy of every token, but max_tokens={self.max_tokens}; "
                "construct the probe with max_tokens=None."
            )
        if self.entropies is None or self._shape is None or len(self._shape) != 2:
            raise ProbeError("token_weights needs a forward pass on a [batch, seq] input first.")

    def state_dict(self) -> dict[str, Any]:
        """Sampling state: ``format_version``, ``seed``, ``calls``, ``dropped_samples`` (ints)."""
        return {
            "format_version": ENTROPY_FORMAT_VERSION,
            "seed": self.seed,
            "calls": self._calls,
            "dropped_samples": self._dropped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the sampling sequence (seed and call count) of a saved probe.

        Raises:
            CheckpointError: if ``state`` is not an EntropyProbe state of this version.
        """
        check_entropy_state(state)
        self.seed, self._calls, self._dropped = (
            state["seed"],
            state["calls"],
            state["dropped_samples"],
        )
        self.decoded_pass = None  # the last pass's entropies are not part of the state

    def __repr__(self) -> str:
        return (
            f"EntropyProbe(max_tokens={self.max_tokens}, seed={self.seed}, calls={self._calls}, "
            f"active={self.active})"
        )
