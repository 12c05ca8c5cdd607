"""The probe batch: the inputs of the model's first training forward pass, kept for λ̂.

A captured batch is about one training batch, re-run through the model (``model(**inputs).loss``)
whenever :class:`graff.probes.lambda_max.LambdaMaxEstimator` builds its Hessian-vector products,
so every estimate sees the same loss surface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from graff._hooks import HookSet, hook_state, restore_hooks
from graff._warn import warn
from graff.errors import ProbeError, ProbeWarning
from graff.probes._context import reads_pass


def output_loss(output: Any) -> Tensor | None:
    """The training loss in a model's forward output, or None.

    ``output.loss`` or ``output["loss"]`` (Hugging Face ``ModelOutput``s, dicts), else the first
    entry of a tuple or list when it is a scalar float tensor: Hugging Face models called with
    ``return_dict=False`` put the loss there when labels are given, and a custom ``(loss,
    logits)`` return does the same. A first entry that is not a scalar (logits) is no loss.
    """
    if isinstance(output, Mapping):
        loss = output.get("loss")
    else:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, (tuple, list)) and output:
            first = output[0]
            if isinstance(first, Tensor) and first.dim() == 0 and first.is_floating_point():
                loss = first
    return loss if isinstance(loss, Tensor) else None


def _detach(obj: Any) -> Any:
    """Detached clones of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


def _plain(obj: Any) -> bool:
    """Whether ``obj`` is made of tensors, numbers, strings, None, lists, tuples and dicts."""
    if obj is None or isinstance(obj, (Tensor, bool, int, float, str)):
        return True
    if isinstance(obj, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return False


class InputCapture:
    """Keeps (detached clones of) the inputs of the first gradient-enabled forward pass.

    The hook ignores the passes :func:`graff.probes._context.reads_pass` rules out (the probe's
    own re-evaluations, and evaluation under ``torch.no_grad()``), and removes itself
    once it has captured a batch. The hook holds the capture weakly (:mod:`graff._hooks`): the
    model never keeps a dropped probe alive, and a copy of a capture that is still waiting for
    a batch hooks the copied model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] | None = None
        self._hooks = HookSet(self)
        self._register_hooks()

    def _register_hooks(self) -> None:
        self._hooks.add_module_hook(self.model, "forward_pre", "_hook", with_kwargs=True)

    def __getstate__(self) -> dict[str, Any]:
        return hook_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        restore_hooks(self, state)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.args is not None or not reads_pass():
            return
        self.args, self.kwargs = _detach(tuple(args)), _detach(dict(kwargs))
        self.remove()

    @property
    def ready(self) -> bool:
        """Whether a probe batch is available."""
        return self.args is not None

    def set(self, inputs: Mapping[str, Any] | None) -> None:
        """Restore ``{"args": [...], "kwargs": {...}}`` (from a state dict) or keep capturing."""
        if inputs is not None:
            self.args, self.kwargs = tuple(inputs["args"]), dict(inputs["kwargs"])
            self.remove()

    def get(self) -> dict[str, Any] | None:
        """The captured inputs as ``{"args": [...], "kwargs": {...}}``, or None.

        None (with a warning) also when an input is not a tensor, number, string, bool or None
        (e.g. a cache object): ``torch.load(weights_only=True)`` could not read it back, and a
        resumed run then captures a new probe batch.
        """
        if self.args is None:
            return None
        out = {"args": list(self.args), "kwargs": dict(self.kwargs or {})}
        if not _plain(out):
            warn(
                "the captured probe batch holds objects weights_only loading cannot restore; it "
                "is not saved, so a resumed run captures a new probe batch. Pass loss_fn= (a "
                "closure on a fixed batch you keep) to avoid this. To silence: "
                "warnings.filterwarnings('ignore', category=graff.errors.ProbeWarning).",
                ProbeWarning,
            )
            return None
        return out

    def loss(self) -> Tensor:
        """Re-run the model on the captured inputs and return ``output.loss``."""
        out = self.model(*(self.args or ()), **(self.kwargs or {}))
        loss = output_loss(out)
        if loss is None:
            raise ProbeError(
                f"the model output ({type(out).__name__}) holds no loss (.loss, ['loss'], or a "
                "tuple starting with the scalar loss): include labels in the batch the model is "
                "called with, or pass loss_fn= (a closure returning the loss)."
            )
        return loss.mean() if loss.numel() > 1 else loss  # one loss per replica: their mean

    def remove(self) -> None:
        """Detach the forward pre-hook (idempotent)."""
        self._hooks.remove()
