"""What the op tests share: the backends that run here, seeded inputs and the comparisons against the reference.

Runners: every kernel backend of an op (registry.OPS[op].backends) that this machine runs: "cpu" (a missing
extension fails its tests, unless MTBERT_FAST_SKIP_BUILD=1 asked for a pure-Python install), Triton on CPU tensors
under its interpreter (TRITON_INTERPRET=1, set per test) when triton is installed, and "cuda" and Triton on CUDA
tensors when a GPU is present.

Tolerances: fp32 within the stated atol/rtol of the reference computed in fp32 on the same inputs; bf16/fp16: the
error against that fp32 reference is at most twice PyTorch's own error computing the same thing in that dtype, plus
a small floor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass

import torch

from mtbert_fast import ops
from mtbert_fast.ops import registry

CPU = torch.device("cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = torch.cuda.is_available()
FLOOR = 1e-6


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op threads set to n inside the block, and back to what they were after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def sequence_groups(allow: bool):
    """Two threads, and the CPU layer stacks free (allow) or not to run each thread on its own sequences
    (ops.stack_by_sequences); both set back after. Yields a list that, after the block, holds the threads that ran
    each attention_varlen call inside it (by torch.profiler, which follows the stacks onto their threads)."""
    before = ops.stack_by_sequences()
    ops.stack_by_sequences(allow)
    calls = []
    try:
        with num_threads(2), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            yield calls
    finally:
        ops.stack_by_sequences(before)
    calls.extend(e.thread for e in prof.events() if e.name == "mtbert_fast_C::attention_varlen")


@dataclass(frozen=True)
class Runner:
    """One backend of one op on one device."""

    op_name: str
    name: str
    device: torch.device

    @property
    def id(self) -> str:
        if self.name == "triton":
            return "triton-interpreter" if self.device.type == "cpu" else "triton-gpu"
        return self.name

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device.type == "cpu"

    @property
    def op(self) -> registry.Op:
        return registry.OPS[self.op_name]

    @property
    def dtypes(self) -> list[torch.dtype]:
        """The floating-point dtypes this backend takes, fp32 first."""
        taken = self.op.dtypes(self.name) or registry.FLOAT_DTYPES
        return [d for d in (torch.float32, torch.bfloat16, torch.float16) if d in taken]

    def forward(self, *args):
        """The dispatcher op on this backend: all its outputs."""
        return self.op.op(*args, backend=self.name)

    def backward(self, *args):
        return self.op.backward_op(*args, backend=self.name)

    def to(self, *tensors):
        return [t.to(self.device) if isinstance(t, torch.Tensor) else t for t in tensors]


def runners(op_name: str) -> list[Runner]:
    """The backends of `op_name` that run on this machine."""
    backends = registry.OPS[op_name].backends
    found = []
    if "cpu" in backends:
        found.append(Runner(op_name, "cpu", CPU))
    if "triton" in backends and HAS_TRITON:
        found.append(Runner(op_name, "triton", CPU))
    if HAS_GPU:
        found += [Runner(op_name, b, torch.device("cuda")) for b in ("cuda", "triton") if b in backends]
    return found


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32, device=CPU) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(device)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(got, ref32, native, dtype, what="output", atol=1e-5, rtol=1e-5, floor=FLOOR):
    """fp32: got within atol/rtol of ref32. Otherwise its error against ref32 is at most twice native's (PyTorch's
    own result in that dtype) plus floor."""
    assert got.shape == ref32.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref32.shape)}"
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref32.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    assert torch.isfinite(got).all() or not torch.isfinite(ref32).all(), f"{what}: non-finite values"
    err, base = max_err(got, ref32), max_err(native, ref32)
    assert err <= 2 * base + floor, f"{what}: {dtype} error {err:.3g} vs PyTorch's own error {base:.3g}"


def table_grad_floor(max_seqlen: int) -> float:
    """The error floor of an attention position table's gradient in bf16 / fp16: the kernels form
    D = rowsum(dO * O) from the output rounded to the dtype (as FlashAttention's backward does), so each dS carries
    that rounding, and one table entry sums up to a sequence's worth of them."""
    return 2**-8 * math.sqrt(max(1, max_seqlen))


def forward_backward(fn, inputs, grad_out=None, seed=9):
    """fn(*inputs) and the gradients of sum(out * grad_out) in every floating-point input (None where fn does not
    use it); grad_out defaults to a seeded random tensor in the output's dtype."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = rand(*out.shape, seed=seed, dtype=out.dtype, device=out.device)
    wrt = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, grad_out.to(out.dtype), allow_unused=True))
    return out.detach(), [next(grads) if t.requires_grad else None for t in leaves]


def compare(fn, ref_fn, native_fn, inputs, dtype, what, **tol):
    """Forward and backward of fn on the inputs in dtype against ref_fn on them upcast to fp32, with native_fn
    (PyTorch in dtype; unused for fp32) giving the allowed error."""
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    upcast = [t.float() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        grad_out = rand(*ref_fn(*upcast).shape, seed=9, dtype=dtype, device=inputs[0].device)
    out, grads = forward_backward(fn, inputs, grad_out)
    ref, ref_grads = forward_backward(ref_fn, upcast, grad_out.float())
    native, native_grads = forward_backward(native_fn, inputs, grad_out) if dtype != torch.float32 else (out, grads)
    assert out.dtype == dtype or out.dtype == torch.float32, f"{what}: output dtype {out.dtype}"
    assert_close(out, ref, native, dtype, f"{what} forward", **tol)
    for i, (g, r, n) in enumerate(zip(grads, ref_grads, native_grads)):
        if r is None:
            continue
        assert g is not None, f"{what}: no gradient for input {i}"
        assert_close(g, r, n, dtype, f"{what} grad of input {i}", **tol)


def cu_seqlens(lengths, device=CPU) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def packed(lengths, heads, head_dim, dtype=torch.float32, seed=0, device=CPU):
    """qkv [T, 3, heads, head_dim], cu_seqlens, max_seqlen for sequences of these lengths."""
    cu = cu_seqlens(lengths, device)
    return rand(int(cu[-1]), 3, heads, head_dim, seed=seed, dtype=dtype, device=device), cu, max(lengths, default=0)


def rng_state(seed=20240611, offset=0) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64)
