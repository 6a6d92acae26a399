"""Backend choice: each backend's real limits (input shapes, the GPUs a CUDA build runs on, shared memory), the
automatic order, forcing a backend by argument or $MTBERT_FAST_BACKEND, and where the backward runs. An automatic
choice never takes a backend that would then refuse the input; a forced one raises with every backend's reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import _ext, ops

from mtbert_fast.ops import dispatch, reference, registry
from op_testing import HAS_TRITON, rand

SM80_SM90 = (["sm_80", "sm_90"], [])
WITH_PTX = (["sm_80", "sm_90"], ["compute_90"])


@pytest.mark.parametrize("build, capability, runs", [
    (SM80_SM90, (8, 0), True),
    (SM80_SM90, (8, 6), True),     # sm_80 machine code runs on later minors of the same major
    (SM80_SM90, (9, 0), True),
    (SM80_SM90, (7, 5), False),
    (SM80_SM90, (10, 0), False),   # no PTX: a newer major has nothing to run
    (SM80_SM90, (12, 0), False),
    (WITH_PTX, (10, 0), True),     # the driver compiles compute_90 PTX for any newer GPU
    (WITH_PTX, (12, 0), True),
    (WITH_PTX, (7, 5), False),
    ((["sm_90a"], []), (9, 0), True),
    ((["sm_90a"], []), (9, 1), False),  # arch-specific code runs on its own GPU only
    ((["sm_75"], ["compute_75"]), (9, 0), True),
])  # fmt: skip
def test_arch_compatibility(build, capability, runs):
    assert dispatch.runs_on(*build, capability) is runs
    assert (dispatch.arch_reason(*build, capability) is None) is runs


def test_arch_reason_names_the_build_and_the_gpu():
    why = dispatch.arch_reason(*SM80_SM90, (12, 0))
    assert why == "mtbert_fast._C holds CUDA code for sm_80, sm_90; this GPU is sm_120"
    assert "PTX compute_75" in dispatch.arch_reason(["sm_75"], ["compute_75"], (7, 0))


def test_parse_arch():
    assert dispatch.parse_arch("sm_90a") == (9, 0, "a")
    assert dispatch.parse_arch("compute_120") == (12, 0, "")
    assert dispatch.parse_arch("sm_86") == (8, 6, "")


def test_cuda_reason_is_read_from_the_build(monkeypatch):
    monkeypatch.setattr(_ext, "cuda_archs", lambda: SM80_SM90)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    monkeypatch.setattr(dispatch, "_device_reasons", {})
    why = dispatch._cuda_device_reason(torch.device("cuda", 0))
    assert why == "mtbert_fast._C holds CUDA code for sm_80, sm_90; this GPU is sm_120"


def test_setup_arch_list_matches_what_dispatch_parses():
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "mtbert_setup_archs", pathlib.Path(__file__).parents[2] / "setup.py", submodule_search_locations=None
    )
    source = spec.loader.get_source(spec.name)
    namespace: dict = {}
    # only the arch helper: executing setup.py would run setup()
    start = source.index("def cuda_arch_names")
    exec(source[start: source.index("\ndef ", start + 1)], namespace)
    names = namespace["cuda_arch_names"]("8.0;9.0+PTX 9.0a")
    assert names == ["sm_80", "sm_90", "compute_90", "sm_90a"]
    assert all(dispatch.parse_arch(n) for n in names)
    with pytest.raises(ValueError, match="'Hopper' is not an architecture"):
        namespace["cuda_arch_names"]("Hopper")


def _qkv(head_dim, tokens=4, heads=1):
    return torch.randn(tokens, 3, heads, head_dim, generator=torch.Generator().manual_seed(0))


def test_head_dim_limit_is_declared_and_explained():
    assert "head_dim <= 256" in dispatch.limits_of("attention_varlen", "triton")
    assert "head_dim <= 256" in dispatch.limits_of("attention_varlen", "cuda")
    assert dispatch.input_reason("triton", "attention_varlen", _qkv(300)) == "head_dim 300 > 256"
    assert dispatch.input_reason("triton", "attention_varlen", _qkv(256)) is None
    assert dispatch.input_reason("cpu", "attention_varlen", _qkv(300)) is None


def test_triton_row_limit():
    x = torch.empty(2, registry.TRITON_MAX_ROW + 1)
    assert "one program holds a row" in dispatch.input_reason("triton", "bias_gelu", x)
    assert dispatch.input_reason("triton", "bias_gelu", x[:, : registry.TRITON_MAX_ROW]) is None


def test_auto_skips_a_backend_whose_limit_the_input_exceeds(monkeypatch):
    """Under the interpreter Triton comes before the CPU kernels; a head_dim it refuses goes to the next backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qkv, cu = _qkv(300), torch.tensor([0, 4], dtype=torch.int32)
    if dispatch.reason("triton", "attention_varlen", qkv.device, qkv.dtype) is not None:
        pytest.skip("Triton is not usable here")
    chosen = dispatch.choose("attention_varlen", qkv)
    assert chosen != "triton"
    out = ops.attention_varlen(qkv, cu, 4)
    torch.testing.assert_close(out, reference.attention_varlen(qkv, cu, 4), atol=1e-5, rtol=1e-5)
    with pytest.raises(ops.BackendUnavailable, match=r"backend 'triton' cannot run this input \(head_dim 300 > 256\)"):
        ops.attention_varlen(qkv, cu, 4, backend="triton")


def test_auto_choice_follows_each_input_shape(monkeypatch):
    """The automatic choice is remembered per op, device and dtype, but each input's shape limits are still read:
    a head_dim Triton refuses goes on, before and after one it takes, and with the interpreter off Triton is out."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.reason("triton", "attention_varlen", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("Triton is not usable here")
    wide, narrow = _qkv(300), _qkv(64)
    assert dispatch.choose("attention_varlen", wide) != "triton"
    assert dispatch.choose("attention_varlen", narrow) == "triton"
    assert dispatch.choose("attention_varlen", wide) != "triton"
    assert dispatch.choose("attention_varlen", narrow) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dispatch.choose("attention_varlen", narrow) != "triton"


def test_backward_follows_the_forward(monkeypatch):
    """The backward runs where the forward ran; after a cuda forward, Triton's backward when it can take the input,
    unless $MTBERT_FAST_BACKEND forces cuda."""
    qkv = _qkv(64)
    for forward in ("cpu", "triton", "reference"):
        assert dispatch.backward_backend("attention_varlen", forward, qkv) == forward
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    want = "triton" if dispatch.why_not("triton", "attention_varlen", qkv) is None else "cuda"
    assert dispatch.backward_backend("attention_varlen", "cuda", qkv) == want
    assert dispatch.backward_backend("attention_varlen", "cuda", _qkv(300)) == "cuda"  # head_dim Triton refuses
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert dispatch.backward_backend("attention_varlen", "cuda", qkv) == "cuda"


def test_auto_prefers_compiled_cpu_kernel():
    x, b = rand(2, 8), rand(8)
    ops.bias_gelu(x, b)
    chosen, passed_over = dispatch.last_choices()[("bias_gelu", "cpu", torch.float32)]
    assert chosen == ("cpu" if _ext.has_kernel("bias_gelu", "CPU") else "reference")
    assert set(passed_over) >= {"cuda", "triton"}


def test_forced_backend_that_cannot_run_names_every_reason():
    x, b = rand(2, 8), rand(8)
    with pytest.raises(ops.BackendUnavailable, match=r"backend 'cuda' cannot run.*cuda:.*triton:.*cpu:.*reference:"):
        ops.bias_gelu(x, b, backend="cuda")


def test_forced_cpu_backend_names_the_dtype():
    assert _ext.loaded(), _ext.load_error
    x, b = rand(2, 8).double(), rand(8).double()
    with pytest.raises(ops.BackendUnavailable, match=r"dtype float64 is not supported \(bfloat16, float32\)"):
        ops.bias_gelu(x, b, backend="cpu")


def test_env_var_forces_backend(monkeypatch):
    x, b = rand(2, 8), rand(8)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ops.BackendUnavailable):
        ops.bias_gelu(x, b)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    torch.testing.assert_close(ops.bias_gelu(x, b), reference.bias_gelu(x, b))
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"MTBERT_FAST_BACKEND=.*'fastest'.*auto, cuda, triton, cpu, reference"):
        ops.bias_gelu(x, b)


def test_float64_falls_back_to_reference_automatically():
    x, b = rand(3, 5).double(), rand(5).double()
    torch.testing.assert_close(ops.bias_gelu(x, b), F.gelu(x + b))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, b = rand(2, 8), rand(8)
    with pytest.raises(ops.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.bias_gelu(x, b, backend="triton")
    assert dispatch.choose("bias_gelu", x) != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose("bias_gelu", x) == "triton"


def test_no_triton_kernel_is_a_reason():
    assert dispatch.reason("triton", "gather_rows", torch.device("cpu"), torch.float32) == "no Triton kernel for gather_rows"
