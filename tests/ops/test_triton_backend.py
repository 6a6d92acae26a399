"""What is particular to the Triton backend's mechanics, on CPU tensors: the attention kernels' grid capped below a
sequence's block count (each program then loops over its blocks), and a compile of every kernel for an H100 (sm_90)
at the GPU launch settings, which needs no GPU. The kernels' results are tested with every other backend's, per op
(test_<op>.py), under Triton's interpreter; here, too, the wrappers' strided index and statistics inputs, which the
kernels read with unit stride."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from mtbert_fast import ops  # noqa: E402
from mtbert_fast.ops import reference, registry  # noqa: E402
from mtbert_fast.ops.triton import _jit  # noqa: E402
from op_testing import compare, packed, rand, rng_state  # noqa: E402

attention_module = importlib.import_module("mtbert_fast.ops.triton.attention_varlen")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("cap", [1, 2])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_attention_varlen_capped_grid(cap, dropout_p, monkeypatch):
    """With the grid's axis 1 capped below a sequence's block count (CUDA allows 65,535; here 1 or 2 programs for
    three blocks of 16), each program loops over its blocks."""
    monkeypatch.setattr(attention_module, "_MAX_GRID_Y", cap)
    grids = {}
    run = _jit.Kernel.run

    def record(kernel, *args, grid, **kwargs):
        grids[kernel.fn.__name__] = grid
        return run(kernel, *args, grid=grid, **kwargs)

    monkeypatch.setattr(_jit.Kernel, "run", record)
    qkv, cu, max_len = packed([40, 3, 33], 2, 32, seed=3)
    rng = rng_state(-5, 2**32 + 9)
    compare(
        lambda q: ops.attention_varlen(q, cu, max_len, dropout_p=dropout_p, rng_state=rng, backend="triton"),
        lambda q: reference.attention_varlen(q, cu, max_len, None, dropout_p, rng),
        None, [qkv], torch.float32, f"attention_varlen capped at {cap} programs", atol=2e-5, rtol=1e-4,
    )
    assert {name: grid[1] for name, grid in grids.items() if name != "_bwd_delta"} == {
        "_fwd": cap, "_bwd_dkdv": cap, "_bwd_dq": cap}
    assert len(grids["_bwd_delta"]) == 1  # rows of T x heads on axis 0


def _strided(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """t's values as a column of a [n, 2] table beside `other`: a view with stride 2, whose unit-stride neighbours
    are other's values."""
    view = torch.stack([t, other], 1)[:, 0]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


@pytest.mark.parametrize("tables", [False, True])
def test_attention_varlen_strided_indices(tables):
    """cu_seqlens and pos_index given as strided views (the kernels read them with unit stride): forward and backward
    (of qkv and of pos_q, pos_k) match the reference on the contiguous ones."""
    qkv, cu, max_len = packed([5, 18], 2, 16, seed=4)
    # the neighbours are in range, so that a unit-stride read computes on other rows and columns rather than faults
    cu_view = _strided(cu, torch.tensor([3, 9, 11], dtype=torch.int32))
    index = torch.tensor([0, 1, 1, 2, 3, 3, 3], dtype=torch.int32)  # P = 3 into W = 4 columns
    index_view = _strided(index, torch.tensor([3, 2, 0, 0, 1, 2, 0], dtype=torch.int32))
    pos = [rand(2, qkv.shape[0], 4, seed=5), rand(2, qkv.shape[0], 4, seed=6)] if tables else []

    def position(pos_index, pos_tables):
        return dict(pos_q=pos_tables[0], pos_k=pos_tables[1], pos_index=pos_index) if pos_tables else {}

    compare(
        lambda q, *t: ops.attention_varlen(q, cu_view, max_len, **position(index_view, t), backend="triton"),
        lambda q, *t: reference.attention_varlen(q, cu, max_len, **position(index, t)),
        None, [qkv, *pos], torch.float32, f"attention_varlen on strided indices, tables {tables}", atol=2e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("op_name", ["bias_residual_layer_norm", "bias_gelu_layer_norm"])
def test_layer_norm_backward_strided_statistics(op_name):
    """The LayerNorm backwards (the public backward ops) with mean and rstd as strided views, which the kernels read
    with unit stride: the same gradients as with the contiguous statistics."""
    op = registry.OPS[op_name]
    x, grad = rand(6, 32, seed=1), rand(6, 32, seed=2)
    bias, weight, beta = (rand(32, seed=seed) for seed in (3, 4, 5))
    residual = (rand(6, 32, seed=6),) if op_name == "bias_residual_layer_norm" else ()
    approximate = () if residual else ("none",)
    _, mean, rstd = op.op(x, bias, *residual, weight, beta, 1e-5, *approximate, "triton")

    def backward(m, r):
        return op.backward_op(grad, x, bias, *residual, weight, m, r, *approximate, "triton")

    want = backward(mean, rstd)
    got = backward(_strided(mean, -mean), _strided(rstd, 2 * rstd))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0.0, rtol=0.0)


_SIGNATURE_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                    torch.int64: "i64"}
# an H100's shared memory per block (227 KiB)
_SM90_SHARED_BYTES = 232448
# the attention kernels' constexpr position flags
_ATTENTION_FLAGS = ("HAS_BIAS", "WINDOWED", "HAS_POS_Q", "HAS_POS_K")


def test_kernels_compile_for_sm90(monkeypatch):
    """Runs every op and its backward with the GPU launch settings, compiling each launch for sm_90 (Triton's own
    compiler and ptxas, no GPU needed) instead of running it: catches what the interpreter accepts and the compiler
    does not, and checks that each kernel's shared memory fits an H100.  The attention kernels compile with and
    without each of their position terms (HAS_BIAS, WINDOWED, HAS_POS_Q, HAS_POS_K)."""
    from triton import compiler
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget

    if "nvidia" not in backends:
        pytest.skip(f"this Triton has no NVIDIA backend (only {sorted(backends)})")

    monkeypatch.delenv("TRITON_INTERPRET")
    compiled, attention_variants = [], set()

    def compile_launch(kernel, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
        signature, constexprs = {}, {}
        for p in kernel.params:
            value = bound[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[p.name] = "*" + _SIGNATURE_TYPES[value.dtype]
            elif isinstance(value, int):
                signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            else:
                signature[p.name] = "fp32"
        src = compiler.ASTSource(kernel, signature, constexprs)
        try:
            binary = compiler.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        except Exception as exc:  # noqa: BLE001 - the message names the kernel and its constants
            raise AssertionError(f"{kernel.fn.__name__} {constexprs} does not compile for sm_90: {exc}") from exc
        assert binary.metadata.shared <= _SM90_SHARED_BYTES, (kernel.fn.__name__, constexprs, binary.metadata.shared)
        compiled.append(f"{kernel.fn.__module__}.{kernel.fn.__name__}")
        if "HAS_BIAS" in constexprs:
            attention_variants.add((kernel.fn.__name__, *(constexprs[flag] for flag in _ATTENTION_FLAGS)))

    monkeypatch.setattr(_jit.Kernel, "run", compile_launch)
    for module in ("attention_varlen", "mlm_gather_loss"):
        monkeypatch.setattr(importlib.import_module(f"mtbert_fast.ops.triton.{module}"), "on_gpu", lambda t: True)

    dt = torch.bfloat16
    x, b = rand(4, 768, dtype=dt).requires_grad_(), rand(768, dtype=dt).requires_grad_()
    w, beta = rand(768, dtype=dt).requires_grad_(), rand(768, dtype=dt).requires_grad_()
    # the kernels launch on CPU tensors here, as the compile replaces each launch: force Triton past the dispatch
    kernel = {name: op.kernel("triton") for name, op in registry.OPS.items() if "triton" in op.backends}
    backward = {name: op.kernel("triton", backward=True) for name, op in registry.OPS.items()
                if "triton" in op.backends and op.backward_schema is not None}
    y = kernel["bias_gelu"](x, b, "tanh")
    backward["bias_gelu"](y, x, b, "tanh")
    y, mean, rstd = kernel["bias_residual_layer_norm"](x, b, x, w, beta, 1e-12)
    backward["bias_residual_layer_norm"](y, x, b, x, w, mean, rstd)
    y, mean, rstd = kernel["bias_gelu_layer_norm"](x, b, w, beta, 1e-12, "none")
    backward["bias_gelu_layer_norm"](y, x, b, w, mean, rstd, "none")
    cu = torch.tensor([0, 10], dtype=torch.int32)
    rng = torch.tensor([-5, 2**32 + 9])
    table = rand(2, 9)  # R = 4
    index = torch.tensor([0, 0, 1, 2, 3, 4, 4], dtype=torch.int32)  # P = 3 into W = 5 columns
    # (dropout_p, rel_bias, window, per-token tables): plain with and without dropout, the bias alone, the window alone
    # (3 < T - 1), both with dropout; pos_q alone, pos_k alone, and both with the bias, the window and dropout
    positions = ((0.0, None, -1, ""), (0.1, None, -1, ""), (0.0, table, -1, ""), (0.0, None, 3, ""),
                 (0.1, table, 3, ""), (0.0, None, -1, "q"), (0.0, None, -1, "k"), (0.1, table, 3, "qk"))
    for dtype, head_dim in ((torch.bfloat16, 64), (torch.float16, 80), (torch.bfloat16, 128), (torch.float32, 64)):
        for dropout_p, rel_bias, window, which in positions:
            qkv = rand(10, 3, 2, head_dim, dtype=dtype)
            pos = tuple(rand(2, 10, 5, dtype=dtype) if side in which else None for side in "qk")
            pos += (index if which else None,)
            out, lse = kernel["attention_varlen"](qkv, cu, 10, 0.125, dropout_p, rng, rel_bias, window, *pos)
            backward["attention_varlen"](out, qkv, out, lse, cu, 10, 0.125, dropout_p, rng, rel_bias, window, *pos)
    h, vw, labels = rand(6, 32, dtype=dt), rand(50, 32, dtype=dt), torch.randint(0, 50, (6,))
    loss, lse = kernel["mlm_gather_loss"](h, vw, torch.zeros(50, dtype=dt), labels, -100, 0)
    backward["mlm_gather_loss"](torch.ones(()), h, vw, torch.zeros(50, dtype=dt), labels, lse, -100, 0)
    y = kernel["geglu"](x, "none")
    backward["geglu"](y, x, "none")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        kernel["rotary_qk"](rand(5, 3, 2, 64, dtype=dtype), *ops.rotary_tables(64, 8, 10000.0), torch.arange(5), False)
    # bias_gelu, and each LayerNorm: forward and backward; attention: forward, delta, dK/dV, dQ; the loss: forward and
    # the backward's recomputed logits; geglu: forward and backward; rotary_qk (its backward is itself)
    assert len(set(compiled)) == 15, sorted(set(compiled))
    # (HAS_BIAS, WINDOWED, HAS_POS_Q, HAS_POS_K) of each entry of positions
    flags = {(False, False, False, False), (True, False, False, False), (False, True, False, False),
             (True, True, False, False), (False, False, True, False), (False, False, False, True),
             (True, True, True, True)}
    assert attention_variants == {(name, *f) for name in ("_fwd", "_bwd_dkdv", "_bwd_dq") for f in flags}, \
        attention_variants
