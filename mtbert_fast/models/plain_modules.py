"""The modules of a fast encoder are read, never called: the encoder takes their weights into its fused kernels.

That holds for FastBertModel's own layers and for the modules of a swapped HF model alike, so whatever a module call
would add (a hook, a wrapper or subclass with its own forward, such as a LoRA adapter, a forward set on the instance)
would be left out without a word. These checks refuse such modules by name instead, and the hook tables installed
here refuse a hook where it is registered.
"""

from __future__ import annotations

import collections

import torch.nn as nn

from mtbert_fast.models.config import UnsupportedModelError

# The module classes whose weights the encoder reads: exactly these, since a subclass or a wrapper (a LoRA adapter, a
# quantized linear) computes something else with them.
PLAIN_MODULES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Identity)
_HOOK_TABLES = {"_forward_hooks": "forward hook", "_forward_pre_hooks": "forward pre-hook",
                "_backward_hooks": "backward hook", "_backward_pre_hooks": "backward pre-hook"}


def _observer(hook) -> bool:
    """transformers' own output-capturing hooks, which it leaves on an HF model's layers once a call asked for hidden
    states: they record outputs only inside HF's forward, and do nothing otherwise."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _not_run(path: str, what: str) -> str:
    return (f"{path} {what}, but mtbert_fast's encoder reads its modules' weights without calling the modules, so it "
            "would never run")


def check_runs_plain(path: str, module: nn.Module) -> None:
    """Refuses, by name, a module whose call would do more than its weights say: hooks, or a forward set on the
    instance (as accelerate's offloading does)."""
    for table, kind in _HOOK_TABLES.items():
        if not all(map(_observer, getattr(module, table, {}).values())):
            raise UnsupportedModelError(_not_run(path, f"has a {kind}") + "; remove it, or hook the model itself")
    if "forward" in module.__dict__:
        raise UnsupportedModelError(_not_run(path, "has its own forward, set on the instance"))


def check_plain_module(path: str, module: nn.Module) -> None:
    """A module whose weights the encoder reads: one of PLAIN_MODULES exactly, running plain. Cheap enough for every
    forward: at once where the module's hook tables are refuse_hooks' (so checked already), in full for a module put
    in since, whose hook tables then become refuse_hooks'."""
    if type(module) in PLAIN_MODULES and type(module.__dict__.get("_forward_hooks")) is _HooksRefused:
        return
    if type(module) not in PLAIN_MODULES:
        raise UnsupportedModelError(
            f"{path} is a {type(module).__module__}.{type(module).__qualname__}, where mtbert_fast's encoder reads the "
            "weights of a plain torch.nn module in place of calling it (a wrapper such as a LoRA adapter would be left "
            "out); merge adapters into the weights first (peft's merge_and_unload)"
        )
    check_runs_plain(path, module)
    refuse_hooks(module, path)


class _HooksRefused(collections.OrderedDict):
    """The hook table of a module inside a fast encoder: registering a hook there raises, since the encoder never
    calls the module (transformers' output-capturing hooks excepted, and kept)."""

    def __init__(self, path: str = "", hooks=()):
        super().__init__()
        self.path = path
        for key, hook in hooks:
            super().__setitem__(key, hook)

    def __setitem__(self, key, value):
        if _observer(value):
            super().__setitem__(key, value)
            return
        raise RuntimeError(_not_run(self.path, "is inside a fast encoder: a hook on it") + "; hook the model itself "
                           "(or, for a swapped HF model, call mtbert_fast.unswap(model) first)")


def refuse_hooks(root: nn.Module, prefix: str = "") -> None:
    """Gives every module under root (root too where a prefix names it) hook tables that refuse hooks."""
    for path, module in root.named_modules(prefix=prefix):
        if path:
            for table in _HOOK_TABLES:
                setattr(module, table, _HooksRefused(path, getattr(module, table).items()))


def allow_hooks(root: nn.Module) -> None:
    """Undoes refuse_hooks under root, keeping the hooks the tables hold."""
    for module in root.modules():
        for table in _HOOK_TABLES:
            hooks = getattr(module, table, None)
            if isinstance(hooks, _HooksRefused):
                setattr(module, table, collections.OrderedDict(hooks.items()))
