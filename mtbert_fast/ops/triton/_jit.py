"""What every Triton kernel file shares: the `jit` decorator that picks compiled or interpreted at launch, launch
settings by device, and the device guard.

Why not plain `@triton.jit`: it reads TRITON_INTERPRET when a function is decorated, that is when its module is
imported, and mtbert_fast.ops.triton is imported by the backend choice (dispatch.py), often before a test sets
TRITON_INTERPRET=1; so are triton.language's own jit functions (tl.sum, tl.max, tl.zeros, ...), decorated at
`import triton`.  `jit` returns a real `JITFunction` (Triton's compiler and torch see an ordinary kernel) that runs
through Triton's interpreter instead whenever TRITON_INTERPRET=1 at launch time, with `_interpreter_compat` in force
for that launch.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from mtbert_fast.ops.registry import TRITON_MAX_ROW

# programs per streaming multiprocessor for the kernels that reduce partial sums over a fixed grid
_PROGRAMS_PER_SM = 4
# the grid of those kernels under the interpreter: small, yet more than one program, so the reduction is exercised
_INTERPRETER_PROGRAMS = 4
# one program holds a whole row in registers: rows longer than this do not fit (Liger-Kernel's MAX_FUSED_SIZE); the
# backend choice declares the same limit, so it never hands Triton a longer row
MAX_ROW_BLOCK = TRITON_MAX_ROW

_interpreted: dict[object, InterpretedFunction] = {}


def interpreting() -> bool:
    """Whether Triton would interpret a kernel launched now (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _as_interpreted(fn) -> InterpretedFunction:
    if fn not in _interpreted:
        _interpreted[fn] = InterpretedFunction(fn)
    return _interpreted[fn]


class Kernel(JITFunction):
    """A `triton.jit` function that chooses, at each launch, between the compiler and the interpreter."""

    def run(self, *args, grid, warmup, **kwargs):
        if interpreting():
            with _interpreter_compat():
                return _as_interpreted(self.fn).run(*args, grid=grid, warmup=warmup, **kwargs)
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)


@contextlib.contextmanager
def _interpreter_compat():
    """Fixes to Triton's interpreter, in force for the duration of one interpreted launch only:

    - calls to jit functions made inside the kernel (our device functions, and triton.language's tl.sum, tl.max,
      tl.zeros, ... when `import triton` ran without TRITON_INTERPRET=1) are interpreted, as they would be had they
      been decorated under TRITON_INTERPRET=1, and the interpreter's patches of triton.language made for such a call
      are undone when it returns (the interpreter's own device-function call leaves them in place, which breaks a
      later compile in the same process); outside a launch, calling a JITFunction raises as before.
    - bf16, which the interpreter stores as raw uint16: tl.dot multiplies the bit patterns as integers (Triton 3.6
      and 3.8), and fp32 -> bf16 casts truncate.  Here bf16 dot operands are widened to fp32 first (exact, as the
      GPU's bf16 MMA multiplies exactly and accumulates in fp32) and fp32 -> bf16 casts round to nearest even, as
      on the GPU.
    - Triton < 3.8: the interpreter turns a scalar (a 1-element array) into a Python int with int(array), which
      NumPy >= 2.4 refuses, so every `range(start, end)` over runtime bounds fails with "only 0-dimensional arrays
      can be converted to Python scalars" (triton-lang/triton#9171); apply the upstream fix (squeeze first).
    """
    import numpy as np
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    create_dot, cast_impl, patch_lang_tensor = builder.create_dot, builder.cast_impl, interpreter._patch_lang_tensor
    saved = {
        (JITFunction, "__call__"): JITFunction.__dict__.get("__call__"),
        (builder, "create_dot"): create_dot,
        (builder, "cast_impl"): cast_impl,
        (interpreter, "_patch_lang_tensor"): patch_lang_tensor,
    }

    def call_interpreted(self, *args, **kwargs):
        scope = interpreter._patch_lang(self.fn)
        try:
            return _as_interpreted(self.fn).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def dot(self, a, b, d, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), d, *args, **kwargs)

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def patch_lang_tensor_squeezed(tensor, scope, *args, **kwargs):
        patch_lang_tensor(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    JITFunction.__call__ = call_interpreted
    builder.create_dot, builder.cast_impl = dot, cast
    if _triton_version() < (3, 8):
        interpreter._patch_lang_tensor = patch_lang_tensor_squeezed
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def jit(fn) -> Kernel:
    """@jit: as @triton.jit, for kernels and for the device functions they call."""
    return Kernel(fn)


def on_gpu(t: torch.Tensor) -> bool:
    """Whether `t` takes the GPU launch settings; CPU tensors (the interpreter) take small blocks instead, so that
    the small shapes of the tests still run the multi-block paths."""
    return t.is_cuda


def reduction_programs(t: torch.Tensor, rows: int) -> int:
    """How many programs share `rows` rows in a kernel that writes per-program partial sums (at least 1)."""
    if t.is_cuda:
        programs = torch.cuda.get_device_properties(t.device).multi_processor_count * _PROGRAMS_PER_SM
    else:
        programs = _INTERPRETER_PROGRAMS
    return max(1, min(rows, programs))


def row_warps(block: int) -> int:
    """num_warps for one row of `block` elements per program (Liger-Kernel's calculate_settings)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def row_block(op: str, d: int) -> int:
    """The power-of-two block that holds a row of `d` elements; raises if a row cannot fit in one program."""
    block = triton.next_power_of_2(max(d, 1))
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"{op}: the Triton kernel holds a row in one program, up to {MAX_ROW_BLOCK} elements; got {d}")
    return block


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device), or nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
