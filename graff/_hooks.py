"""Hooks that hold their owner weakly, and re-register on copies.

graff's schedulers and probes read the training loop through hooks on the user's optimizer and
model. Two rules keep those hooks from changing the objects' lifetimes or going stale:

* A hook is a :class:`WeakHook`: it calls a method of its owner (a scheduler, a probe) through a
  weak reference. So the optimizer and the model never keep a dropped scheduler alive, and no
  reference cycle runs optimizer -> hook -> scheduler -> optimizer: dropping the optimizer and
  the scheduler frees both by reference counting. A :class:`HookSet` removes its owner's hooks as
  soon as the owner is collected (or on :meth:`HookSet.remove`).
* Hooks are not copied. torch's ``Optimizer`` drops its step hooks when it is deep-copied or
  pickled, and a copied module's hooks would call the original's owner; so a copied or unpickled
  :class:`WeakHook` calls nothing, and each owner's ``__setstate__`` registers fresh hooks on the
  optimizer and model its copy holds (:func:`hook_state`, :func:`restore_hooks`), after removing
  the dead copies from those modules.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graff.errors import GraffError

# torch < 2.3 has no torch.compiler.is_compiling (nor the stance graff's probes need)
_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)
# the dicts, keyed by hook id, that torch keeps beside a module's _forward(_pre)_hooks
_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_EXTRA_HOOK_DICTS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


class WeakHook:
    """A hook that calls ``owner.<method>(*args)``, or nothing once the owner is gone.

    A copy or an unpickled one calls nothing: hooks belong to the object that registered them,
    and a copy of that object registers its own.
    """

    __slots__ = ("_method", "_ref")

    def __init__(self, owner: Any, method: str) -> None:
        self._ref = None if owner is None else weakref.ref(owner)
        self._method = method

    @property
    def alive(self) -> bool:
        """Whether the owner still exists (a dead hook is a no-op)."""
        return self._ref is not None and self._ref() is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _outside_graph is not None and _is_compiling():  # traced by torch.compile
            return _outside_graph(self, args, kwargs)
        owner = None if self._ref is None else self._ref()
        if owner is None:
            return None
        return getattr(owner, self._method)(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (WeakHook, (None, self._method))

    def __repr__(self) -> str:
        owner = None if self._ref is None else self._ref()
        return f"WeakHook({type(owner).__name__ if owner is not None else 'dead'}.{self._method})"


def _call_hook(hook: WeakHook, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return hook(*args, **kwargs)


#: ``torch.compiler.disable(_call_hook)``: calls a hook eagerly where ``torch.compile`` would
#: otherwise trace it into the graph. A graff hook keeps Python state (counters, sampled
#: positions, running sums): traced, its branches become guards that fail on every call (a
#: recompilation each step) and its side effects run once, at tracing time. Disabled, it runs
#: on every call as in eager mode, at the cost of a graph break where it sits. Built when the
#: first module hook is registered, not at ``import graff``: it imports ``torch._dynamo`` (~1 s
#: of CPU), which a torch optimizer's first ``step()`` and Hugging Face's libraries import anyway.
_outside_graph: Callable[..., Any] | None = None


def _prepare_for_compile() -> None:
    global _outside_graph
    if _outside_graph is None and hasattr(torch.compiler, "disable"):
        _outside_graph = torch.compiler.disable(_call_hook)


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class HookSet:
    """The hooks one owner registered; removed by :meth:`remove` or when the owner is collected."""

    def __init__(self, owner: Any) -> None:
        self._owner = weakref.ref(owner)
        self._handles: list[Any] = []
        # holds the handles, not the owner: it cannot keep the owner alive
        self._finalizer = weakref.finalize(owner, _remove_handles, self._handles)
        self._finalizer.atexit = False

    def add(self, register: Callable[..., Any], method: str, **kwargs: Any) -> None:
        """``register(WeakHook(owner, method), **kwargs)``, e.g. ``module.register_forward_hook``."""
        if not self._finalizer.alive:
            raise GraffError("this object's hooks were removed; build a new one to hook again.")
        self._handles.append(register(WeakHook(self._owner(), method), **kwargs))

    def add_module_hook(self, module: nn.Module, kind: str, method: str, **kwargs: Any) -> None:
        """Hook ``module`` (``kind``: ``forward`` or ``forward_pre``), dropping dead graff hooks."""
        if "_forward_hooks" not in vars(module):
            raise GraffError(
                f"cannot hook {type(module).__name__}: it is not built yet (a copy of a model that "
                "refers to its own scheduler). Copy the model alone and build a new scheduler, or "
                "checkpoint with state_dict()."
            )
        strip_dead_hooks(module)
        _prepare_for_compile()  # the model may be compiled, now or later
        self.add(getattr(module, f"register_{kind}_hook"), method, **kwargs)

    @property
    def active(self) -> bool:
        """Whether the hooks are still attached."""
        return self._finalizer.alive

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        self._finalizer()

    def __reduce__(self) -> tuple[Any, ...]:
        raise GraffError("HookSet is not copied: its owner's __getstate__ leaves it out.")


def strip_dead_hooks(module: nn.Module) -> None:
    """Delete the graff hooks of ``module`` whose owner is gone (copies of hooks call nothing)."""
    d = vars(module)
    for name in _MODULE_HOOK_DICTS:
        hooks = d.get(name)
        if not hooks:
            continue
        for key, hook in list(hooks.items()):
            if isinstance(hook, WeakHook) and not hook.alive:
                del hooks[key]
                for extra in _EXTRA_HOOK_DICTS:
                    extras = d.get(extra)
                    if extras is not None:
                        extras.pop(key, None)


def hook_state(obj: Any, attr: str = "_hooks") -> dict[str, Any]:
    """``obj.__dict__`` for ``__getstate__``, its :class:`HookSet` replaced by whether it is active."""
    state = obj.__dict__.copy()
    hooks = state.get(attr)
    state[attr] = isinstance(hooks, HookSet) and hooks.active
    return state


def restore_hooks(obj: Any, state: dict[str, Any], attr: str = "_hooks") -> None:
    """``__setstate__``: restore ``state``, then re-register the hooks if the original had them.

    ``obj._register_hooks()`` hooks the optimizer and model that ``state`` refers to (the copies
    in a ``deepcopy`` or a pickle of both).
    """
    active = state.get(attr)
    obj.__dict__.update(state)
    obj.__dict__[attr] = HookSet(obj)
    if active:
        obj._register_hooks()
    else:
        obj.__dict__[attr].remove()
