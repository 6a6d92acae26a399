"""Packed copies of linear weights for CPU inference, made once per weight and reused.

Handed a plain [N, K] weight, oneDNN's matrix product copies it into its blocked layout on every call, a few percent
of a BERT forward on the CPU. `onednn_weight(w)` makes that blocked copy once and returns it while `w` is unchanged.
`panel_weight(w)` does the same for the column panels of `mtbert_fast.ops.panel_linear`, which the encoder uses for
inputs of few rows; a weight gets that second copy only once such an input has run. `mkl_weight(w)` keeps MKL's
float32 pack of a float32 or bf16 weight for `mtbert_fast.ops.mkl_linear`, which the encoder uses in place of oneDNN's
linear for the rows `mkl_linear.encoder_rows()` gives (about 2.2x the weight's float32 bytes; a weight gets a oneDNN
pack as well only once an input of more rows runs).
A pack stays valid while the weight keeps its storage, offset, shape, strides and version counter: in-place updates
through the tensor (optimizer steps, `load_state_dict`, `copy_` under no_grad) bump the version, and `.to()`,
`.half()` or assigning `.data` give it other storage. Two cases cannot be seen and are never packed or must be
released by hand:
  - inference tensors (made under torch.inference_mode) have no version counter, so they are never packed;
  - writes through `w.data` bypass the version counter, as they bypass autograd: call `release_packs()` after them.

The products on packs have no autograd: the encoder uses them in inference and, in eval mode, as the forward of products
that autograd records (their backward reads the plain weight), for weights that are `settled` (unchanged since the
call before).
A pack costs one more copy of the weight's memory, freed with the weight.

oneDNN multiplies bf16 on bf16 instructions only where the CPU has AVX512-BF16, AMX or AVX-NE-CONVERT; on other
AVX-512 CPUs it takes bf16 operands but runs at about a quarter of its float32 rate, and on AVX2 CPUs not at all.
There a bf16 weight's oneDNN pack is float32, twice the weight's memory: its products run on the float32 kernels,
with the same exact products and float32 sums as a bf16 product (see `onednn_weight`). Its panels stay bf16
everywhere.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from mtbert_fast._ext import _cpu_flags, has_kernel
from mtbert_fast.ops.mkl_linear import pack_mkl
from mtbert_fast.ops.panel_linear import pack_panels

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# the x86 CPU features on which oneDNN's bf16 products run on bf16 instructions
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "avx_ne_convert"})


def _onednn_bf16() -> bool:
    """Whether oneDNN multiplies bf16 operands here at a bf16 rate. torch says yes on every AVX-512 CPU, where oneDNN
    without the instructions above widens the operands itself: a [1024, 768] x [768, 3072] product ran at 60 GFLOP/s
    in bf16 against 274 in float32 on a 2-core Xeon with AVX-512 and VNNI but no AVX512-BF16, and at 228 as float32
    products on the bf16 values widened. Off x86 (no such flags) torch's answer stands."""
    if not (AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    flags = _cpu_flags() or set()
    return not {"avx2", "avx512f"} & flags or bool(BF16_CPU_FLAGS & flags)


# whether oneDNN multiplies bf16 operands on this CPU
ONEDNN_BF16 = _onednn_bf16()
# whether it does so on AMX tiles, where the encoder hands it some products in blocks of rows (the CPU kernels'
# onednn_row_block says which)
ONEDNN_AMX_BF16 = ONEDNN_BF16 and "amx_bf16" in (_cpu_flags() or set()) and has_kernel("post_norm_layers", "CPU")


class _Pack(NamedTuple):
    storage: StorageWeakRef  # holds the storage's identity (not its memory), so its address cannot be reused
    layout: tuple  # offset, shape, strides, dtype, version
    packed: torch.Tensor


# per kind of pack: id(weight) -> (a weak reference to the weight, its pack); the reference's callback drops the entry
# when the weight dies, before its id can be reused. Plain dictionary reads: a WeakIdKeyDictionary lookup builds a key
# object.
_packs: dict[str, dict[int, tuple[weakref.ref, _Pack]]] = {"onednn": {}, "panels": {}, "mkl": {}}
# the layout each weight had when settled() last read it: id -> (weak reference, layout)
_looked: dict[int, tuple[weakref.ref, tuple]] = {}
# how many times release_packs has run: what holds packs beyond this module (the encoder's layer caches) drops them
# when it changes
_releases = 0


def _layout(w: torch.Tensor) -> tuple:
    return (w.storage_offset(), tuple(w.shape), w.stride(), w.dtype, w._version)


def _packable(w: torch.Tensor) -> bool:
    # not while torch.compile traces: the cache, keyed on id(w), would make it guard on every weight and recompile
    return (w.device.type == "cpu" and not w.is_inference() and not (w.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling())


def _cached(kind: str, w: torch.Tensor, make, made_for: tuple = ()) -> torch.Tensor:
    """The `kind` pack of w, made by make(w) on first use and again whenever w has changed or made_for (what else the
    pack depends on) is not what it was. The pack records how many releases had run before it read w: one made from
    w's values of before a write through .data and the release_packs() after it (another thread packing meanwhile)
    is used by the call that made it only, and made again by the next."""
    cache = _packs[kind]
    key = id(w)
    entry = cache.get(key)
    pack = entry[1] if entry is not None and entry[0]() is w else None
    layout = _layout(w) + made_for + (_releases,)
    if pack is None or pack.layout != layout or pack.storage.cdata != w.untyped_storage()._cdata:
        with torch.no_grad():
            packed = make(w.detach().contiguous())
        pack = _Pack(StorageWeakRef(w.untyped_storage()), layout, packed)
        cache[key] = (weakref.ref(w, lambda _, key=key: cache.pop(key, None)), pack)
    return pack.packed


def settled(w: torch.Tensor) -> bool:
    """Whether `w` is as the last settled(w) found it: the same storage, offset, shape, strides and version, and no
    release_packs() since. The encoder packs a weight that autograd reaches only once it is settled, so that a model
    stepped by an optimizer between calls in eval mode does not make every pack anew at every call. An inference
    tensor (no version counter) is never settled."""
    if w.is_inference():
        return False
    key = id(w)
    entry = _looked.get(key)
    layout = _layout(w) + (_releases, w.untyped_storage()._cdata)
    if entry is not None and entry[0]() is w and entry[1] == layout:
        return True
    _looked[key] = (weakref.ref(w, lambda _, key=key: _looked.pop(key, None)), layout)
    return False


def onednn_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which oneDNN's linear multiplies a `dtype` weight here: float32 for bf16 on a CPU where oneDNN
    has no bf16 product, else `dtype`."""
    return torch.float32 if dtype == torch.bfloat16 and not ONEDNN_BF16 else dtype


def pack_onednn(w: torch.Tensor) -> torch.Tensor:
    """`w` [N, K] copied now into oneDNN's blocked layout, in `onednn_dtype(w.dtype)`, uncached (`onednn_weight`
    keeps one per weight)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.to(onednn_dtype(w.dtype)))


def onednn_weight(w: torch.Tensor) -> torch.Tensor:
    """`w` [N, K] for `torch.ops.mkldnn._linear_pointwise`, in `onednn_dtype(w.dtype)`: in oneDNN's blocked layout,
    packed on first use and again whenever `w` has changed; where it cannot be packed (see the module docstring),
    `w` itself, or `w` widened to float32 on every call for a bf16 `w` that oneDNN cannot multiply here. The caller
    widens x (and the bias) to the returned dtype."""
    if not AVAILABLE or not _packable(w):
        return w.to(onednn_dtype(w.dtype))
    return _cached("onednn", w, pack_onednn)


def panel_weight(w: torch.Tensor) -> torch.Tensor | None:
    """`w` [N, K] packed for `mtbert_fast.ops.panel_linear` (the linear of few rows), on first use and again whenever
    `w` has changed; None where it cannot be packed (see the module docstring)."""
    if not _packable(w):
        return None
    return _cached("panels", w, pack_panels)


def mkl_weight(w: torch.Tensor) -> torch.Tensor | None:
    """The float32 or bfloat16 `w` [N, K] packed (as float32) for `mtbert_fast.ops.mkl_linear`, on first use and again
    whenever `w` has changed or torch's thread count is not the one it was packed under (MKL plans a pack's work for
    that count: a pack made on one thread ran products of 160-256 rows on one thread of two); None where it cannot be
    packed (see the module docstring) or is of another dtype."""
    if w.dtype not in (torch.float32, torch.bfloat16) or not _packable(w):
        return None
    return _cached("mkl", w, pack_mkl, (torch.get_num_threads(),))


def release_packs() -> None:
    """Drops every cached pack; the next inference call packs its weights afresh."""
    global _releases
    for cache in _packs.values():
        cache.clear()
    _releases += 1


def releases() -> int:
    """How many times release_packs has run."""
    return _releases


def _fused_step_writes(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer's step: a fused step (fused=True, as for AdamW and Adam) writes the parameters in place
    without moving their version counters on, which every cache here keys on, so they are moved on for it."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            params = [p for p in group["params"] if not p.is_inference()]
            if params:
                torch.autograd.graph.increment_version(params)


register_optimizer_step_post_hook(_fused_step_writes)


def pack_count(kind: str = "onednn") -> int:
    """How many weights hold a pack of `kind` ("onednn", "panels", "mkl") now."""
    return len(_packs[kind])
