"""Logit-lens discovery: the decoder layers and the final norm + LM head of a causal LM, and the
entropy of the logits it decodes (:func:`entropy_from_logits`).

Hugging Face causal LMs are found also inside peft wrappers: Llama/Qwen/Mistral style
(``model.layers``, ``model.norm``, ``lm_head``) and GPT-2 style (``transformer.h``,
``transformer.ln_f``, ``lm_head``). :class:`graff.probes.entropy.EntropyProbe` hooks the layer
and decodes its hidden states with the lens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from graff.errors import GraffConfigError, ProbeError

__all__ = ["entropy_from_logits", "resolve_layer_and_head"]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy :math:`H = -\\sum_v p_v \\log p_v` of ``softmax(logits)`` over the last dim, in float32.

    Uses ``log_softmax`` (no overflow for large logits); entries with :math:`p_v = 0`
    (``-inf`` logits) contribute 0. NaN or ``+inf`` logits give a NaN entropy for that row.

    Args:
        logits: ``[..., vocab]`` tensor of any float dtype.

    Returns:
        Float32 tensor of shape ``logits.shape[:-1]``.

    Examples:
        >>> round(entropy_from_logits(torch.zeros(4)).item(), 4)  # log(4)
        1.3863
    """
    p = logits.float().softmax(dim=-1)
    # xlogy(0, 0) = 0: entries with p = 0 contribute 0; a NaN p (NaN or +inf logits) propagates
    return torch.special.xlogy(p, p).sum(-1).neg_()


class _LogitLens:
    """``hidden -> lm_head(norm(hidden))`` without referencing the whole model."""

    def __init__(
        self, norm: Callable[[Tensor], Tensor], lm_head: Callable[[Tensor], Tensor]
    ) -> None:
        self.norm, self.lm_head = norm, lm_head

    def __call__(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden))


#: Submodule names under which wrappers keep the model they wrap.
_WRAPPED = ("base_model", "model", "_orig_mod", "module")


def _candidates(model: nn.Module) -> list[nn.Module]:
    """``model`` and what it wraps: peft (PeftModel -> LoraModel -> the causal LM), torch.compile
    (``_orig_mod``) and DDP/DataParallel (``module``)."""
    seen, out, todo = set(), [], [model]
    while todo and len(out) < 8:
        m = todo.pop(0)
        if not isinstance(m, nn.Module) or id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        get_base = getattr(m, "get_base_model", None)
        if callable(get_base):
            todo.append(get_base())
        todo.extend(m._modules[k] for k in _WRAPPED if k in m._modules)
    return out


def _detect(model: nn.Module) -> tuple[nn.ModuleList | None, Callable[[Tensor], Tensor] | None]:
    """Decoder layers and logit lens of a Llama/Qwen/Mistral- or GPT-2-style causal LM."""
    for m in _candidates(model):
        lm_head = m._modules.get("lm_head")
        for trunk_name, layers_name, norm_name in (
            ("model", "layers", "norm"),
            ("transformer", "h", "ln_f"),
        ):
            trunk = m._modules.get(trunk_name)
            layers = trunk._modules.get(layers_name) if trunk is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                norm = trunk._modules.get(norm_name)
                lens = (
                    _LogitLens(norm, lm_head) if norm is not None and lm_head is not None else None
                )
                return layers, lens
    return None, None


def resolve_layer_and_head(
    model: nn.Module,
    layer: nn.Module | None,
    head: Callable[[Tensor], Tensor] | None,
    index: int,
) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """The hooked layer and the head: those given, else decoder layer ``index`` and the lens.

    Raises:
        ProbeError: if no decoder layer or no final norm and LM head can be found.
        GraffConfigError: if ``index`` is past the last decoder layer.
    """
    layers, lens = _detect(model) if layer is None or head is None else (None, None)
    if layer is None:
        if layers is None:
            raise ProbeError(
                f"EntropyProbe found no decoder layers in {type(model).__name__}: it looks for "
                "model.layers (Llama/Qwen/Mistral) and transformer.h (GPT-2), also inside peft "
                "wrappers. Pass layer=<the nn.Module whose output is the hidden state>."
            )
        if index >= len(layers):
            raise GraffConfigError(
                f"layer_index must be in [0, {len(layers) - 1}] for this model with "
                f"{len(layers)} decoder layers, got {index!r}."
            )
        layer = layers[index]
    if head is None:
        if lens is None:
            raise ProbeError(
                f"EntropyProbe found no final norm and lm_head in {type(model).__name__}. "
                "Pass head=<callable mapping hidden states [k, hidden] to logits [k, vocab]>."
            )
        head = lens
    return layer, head
