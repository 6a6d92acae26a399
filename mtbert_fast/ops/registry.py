"""The op registry: every mtbert_fast op declared once, in its own file, as an `Op`.

An `Op` holds everything the package knows about one op: its name and schema, its plain-PyTorch reference, the
backends that have a kernel for it with the dtypes and input limits each takes, its fake (meta) implementation and
its autograd formula. From that one declaration it registers, with torch.library:

- `mtbert_fast::<name>(<schema>, str backend='auto')`, the op that the wrappers call and that torch.compile sees:
  its implementation runs the kernel of the backend named by `backend` (resolved by the dispatch), its fake
  describes the outputs for every backend, and its autograd formula is registered once for all of them;
- `mtbert_fast::<name>_backward(<backward schema>, str backend='auto')`, the same for the backward kernels;
- `mtbert_fast_C::<name>` and `mtbert_fast_C::<name>_backward`: the schemas of the C++ kernels, which the compiled
  extension implements for the CPU and CUDA dispatch keys (csrc/cpu, csrc/cuda).

The first output of an op is its result; any further outputs are saved for the backward (LayerNorm statistics, the
log-sum-exp of attention). The reference returns the result alone and is differentiated by PyTorch's autograd, so it
stays an independent oracle for the kernels' backward formulas.

The dispatch (dispatch.py), the wrappers (one file per op), `python -m mtbert_fast.info`, the tests and CI's check of
the CUDA build all read `OPS`. Triton kernels are named by module path and imported only when first used, so
nothing here imports Triton.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode

NAMESPACE = "mtbert_fast"
KERNEL_NAMESPACE = "mtbert_fast_C"
BACKENDS = ("cuda", "triton", "cpu", "reference")
KERNEL_BACKENDS = ("cuda", "triton", "cpu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.bfloat16, torch.float32)
TRITON_MODULES = "mtbert_fast.ops.triton"

# input limits the kernels declare (the Triton kernels read them too)
MAX_HEAD_DIM = 256
CUDA_MAX_HEADS = 65535
INT32_ROWS = 2**31 - 1
TRITON_MAX_ROW = 65536  # a Triton row-op program holds one row in registers

# The CPU product kernels' tiles read their rows of x side by side; rows a multiple of 4 KiB apart fall into one set
# of the 8-way L1 cache and evict each other once a tile takes more than 8 of them. The kernels then keep such rows
# one cache line further apart (csrc/include/tile_rows.h); the ops' fakes give the same strides with these.
CACHE_LINE = 64


def tile_rows_alias(tile_rows: int, row_bytes: int) -> bool:
    """Whether rows `row_bytes` apart evict each other in a tile of `tile_rows` rows."""
    return tile_rows > 8 and row_bytes > 0 and row_bytes % 4096 == 0


_lib = torch.library.Library(NAMESPACE, "DEF")
# FRAGMENT: the CUDA build also defines its tensor-less queries (cuda_archs, ...) in this namespace, in C++
_kernel_lib = torch.library.Library(KERNEL_NAMESPACE, "FRAGMENT")

OPS: dict[str, Op] = {}


@dataclass(frozen=True)
class Limit:
    """An input a backend refuses, declared once: `text` for people, `violated(t)` says why an input like `t` (the
    op's main tensor) is outside the limit, or None."""

    text: str
    violated: Callable[[torch.Tensor], str | None]


@dataclass(frozen=True)
class Backend:
    """One backend's kernels for an op.

    forward, backward: the kernels. For cpu and cuda, None means the extension's `mtbert_fast_C::<name>` and
    `mtbert_fast_C::<name>_backward`, or a function that adapts them to the op's schema; for triton, the name of a
    function in the op's module of mtbert_fast.ops.triton.
    dtypes: the dtypes of the main input it takes (None: any dtype).
    limits: the inputs it refuses although it takes their device and dtype.
    """

    forward: Callable | str | None = None
    backward: Callable | str | None = None
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES
    limits: tuple[Limit, ...] = ()


@dataclass
class Op:
    """One op, declared once; constructing it registers it with torch.library and in OPS.

    schema: "(Tensor x, Tensor bias, str approximate) -> Tensor", the kernels' arguments and outputs.
    reference: plain PyTorch, taking the schema's arguments and returning the op's result (the first output).
    backends: "cpu" / "cuda" / "triton" -> Backend; the reference backend is always there.
    main: the index of the input whose device, dtype and shape choose the backend.
    result_outputs: how many leading outputs form the result (the rest are saved for the backward); the reference
    returns exactly those.
    fake: the outputs' metadata for the schema's arguments (new contiguous tensors, as every kernel returns).
    backward_schema, backward_fake: the backward kernels' op, when the autograd formula calls one;
    cpp_backward_schema: the C++ backward kernels' schema where it differs (a Backend adapter then bridges them).
    setup_context(ctx, inputs, output) and backward(ctx, *grads) -> one gradient per schema argument: the autograd
    formula; `inputs` and `ctx.backend` exclude the trailing backend argument, and `op.backward_kernel(ctx.backend)`
    is the backward op bound to the backend that ran the forward.
    more_keys: dispatch keys beyond CPU and CUDA that the op's inputs can carry (MkldnnCPU: a weight in oneDNN's
    blocked layout); the op is registered for them too, and its C++ kernel must be.
    """

    name: str
    schema: str
    reference: Callable
    backends: dict[str, Backend]
    fake: Callable
    main: int = 0
    result_outputs: int = 1
    backward_schema: str | None = None
    cpp_backward_schema: str | None = None
    backward_fake: Callable | None = None
    setup_context: Callable | None = None
    backward: Callable | None = None
    more_keys: tuple[str, ...] = ()
    _kernels: dict[tuple[str, str], Callable] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.name in OPS:
            raise ValueError(f"op {self.name} is declared twice")
        unknown = set(self.backends) - set(KERNEL_BACKENDS)
        if unknown:
            raise ValueError(f"op {self.name}: unknown backends {sorted(unknown)}")
        OPS[self.name] = self
        self._define(self.name, self.schema, self.schema, self._forward_impl, self.fake)
        namespace = getattr(torch.ops, NAMESPACE)
        # the dispatcher ops torch.ops.mtbert_fast.<name> (and <name>_backward): plain attributes, which torch.compile
        # reads without a trace break (a cached_property takes a lock)
        self.op: torch._ops.OpOverload = getattr(namespace, self.name).default
        self.backward_op: torch._ops.OpOverload | None = None
        if self.backward_schema is not None:
            self._define(f"{self.name}_backward", self.backward_schema, self.cpp_backward_schema or self.backward_schema,
                         self._backward_impl, self.backward_fake)
            self.backward_op = getattr(namespace, f"{self.name}_backward").default
        if self.backward is not None:
            torch.library.register_autograd(
                f"{NAMESPACE}::{self.name}", self._autograd_backward, setup_context=self._autograd_setup, lib=_lib
            )

    # ---- registration ------------------------------------------------------------------------------------------

    def _define(self, name: str, schema: str, cpp_schema: str, impl: Callable, fake: Callable) -> None:
        if any(b in self.backends for b in ("cpu", "cuda")):
            _kernel_lib.define(name + kernel_schema(cpp_schema))
        _lib.define(name + _with_backend(schema))
        for key in ("CPU", "CUDA", *self.more_keys):
            _lib.impl(name, impl, key)
        torch.library.register_fake(f"{NAMESPACE}::{name}", _drop_backend(fake, name), lib=_lib)

    def _forward_impl(self, *args):
        *inputs, backend = _all_arguments(self.op, args)
        if backend == "auto":
            backend = self._resolve(inputs[self.main])
        return self.kernel(backend)(*inputs)

    def _backward_impl(self, *args):
        *inputs, backend = _all_arguments(self.backward_op, args)
        if backend == "auto":
            backend = self._resolve(inputs[0])
        return self.kernel(backend, backward=True)(*inputs)

    def _resolve(self, tensor: torch.Tensor) -> str:
        from mtbert_fast.ops import dispatch

        backend = dispatch.choose(self.name, tensor)
        if backend == "reference":
            raise dispatch.BackendUnavailable(
                f"{self.name}: no kernel can run this input (only the reference, which runs outside the op)"
            )
        return backend

    def _autograd_setup(self, ctx, inputs, output):
        *inputs, backend = inputs
        ctx.backend = backend
        self.setup_context(ctx, tuple(inputs), output)

    def _autograd_backward(self, ctx, *grads):
        return tuple(self.backward(ctx, *grads)) + (None,)

    # ---- kernels -----------------------------------------------------------------------------------------------

    def kernel(self, backend: str, backward: bool = False) -> Callable:
        """The function that runs `backend`'s forward (or backward) kernel on the schema's arguments."""
        key = (backend, "backward" if backward else "forward")
        if key not in self._kernels:
            if backend not in self.backends:
                raise ValueError(f"{self.name}: no {backend} kernel (it has {', '.join(self.backends)})")
            spec = self.backends[backend].backward if backward else self.backends[backend].forward
            if isinstance(spec, str):
                module = importlib.import_module(f"{TRITON_MODULES}.{self.name}")
                fn = getattr(module, spec)
            elif spec is None:
                ns = getattr(torch.ops, KERNEL_NAMESPACE)
                fn = getattr(ns, f"{self.name}_backward" if backward else self.name)
            else:
                fn = spec
            self._kernels[key] = fn
        return self._kernels[key]

    def backward_kernel(self, backend: str) -> Callable:
        """The backward op bound to `backend`: what an autograd formula calls."""
        op = self.backward_op
        return lambda *args: op(*args, backend)

    def __call__(self, *inputs, backend: str | None = None):
        """The op's result on the backend the dispatch chooses for these inputs (or the one `backend` forces)."""
        from mtbert_fast.ops import dispatch

        main = inputs[self.main]
        grad = torch.is_grad_enabled()
        if grad and self.backward is None and _any_requires_grad(inputs):
            raise RuntimeError(f"{self.name} has no backward (it runs inference only): call it under torch.no_grad() "
                               "or torch.inference_mode()")
        chosen = dispatch.choose(self.name, main, backend)
        if chosen == "reference":
            return self.reference(*inputs)
        if grad or torch.compiler.is_compiling() or type(main) is not torch.Tensor or _dispatch_mode() is not None:
            out = self.op(*inputs, chosen)
        else:  # nothing to record for autograd, a graph or a mode: the kernel itself, without the dispatcher op's hop
            out = self.kernel(chosen)(*inputs)
        if not isinstance(out, (tuple, list)):
            return out
        return out[0] if self.result_outputs == 1 else tuple(out[: self.result_outputs])

    # ---- what the dispatch and info read -----------------------------------------------------------------------

    def dtypes(self, backend: str) -> tuple[torch.dtype, ...] | None:
        return self.backends[backend].dtypes

    def limits(self, backend: str) -> tuple[Limit, ...]:
        return self.backends[backend].limits if backend in self.backends else ()


def kernel_schema(schema: str) -> str:
    """The C++ kernels' schema of an op's: sizes that follow the data (max_seqlen, num_rows) are SymInt in the
    dispatcher op, so that torch.compile keeps them symbolic instead of compiling once per value; the kernels take
    them as int."""
    return schema.replace("SymInt ", "int ")


def _with_backend(schema: str) -> str:
    """'(Tensor x) -> Tensor' -> "(Tensor x, str backend='auto') -> Tensor"."""
    args, arrow, outputs = schema.partition(") ->")
    if not arrow:
        raise ValueError(f"schema {schema!r} has no ') ->'")
    return f"{args}, str backend='auto'{arrow}{outputs}"


def _all_arguments(op: torch._ops.OpOverload, args: tuple) -> tuple:
    """args as the schema lists them: the dispatcher leaves out trailing arguments equal to their defaults (the
    backend 'auto' among them) before it calls a Python kernel or fake."""
    params = op._schema.arguments
    return tuple(args) + tuple(p.default_value for p in params[len(args):])


def _any_requires_grad(inputs: tuple) -> bool:
    return any(t.requires_grad for x in inputs for t in (x if isinstance(x, (list, tuple)) else (x,))
               if isinstance(t, torch.Tensor))


def _drop_backend(fake: Callable, name: str) -> Callable:
    def fake_without_backend(*args):
        op = getattr(getattr(torch.ops, NAMESPACE), name).default
        return fake(*_all_arguments(op, args)[:-1])

    return fake_without_backend
