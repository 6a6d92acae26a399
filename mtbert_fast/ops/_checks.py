"""Argument checks shared by the op wrappers: every failure names the op, the tensor and what was expected."""

from __future__ import annotations

import torch

from mtbert_fast.ops.registry import CPU_DTYPES, TRITON_MAX_ROW, Backend, Limit

GELU_KINDS = ("none", "tanh")


def check_gelu(op: str, approximate: str) -> None:
    if approximate not in GELU_KINDS:
        raise ValueError(f"{op}: approximate must be 'none' (erf) or 'tanh', got {approximate!r}")


def check_rows(
    op: str, x: torch.Tensor, *, same_shape: dict[str, torch.Tensor] | None = None,
    vectors: dict[str, torch.Tensor] | None = None, params: dict[str, torch.Tensor] | None = None,
) -> None:
    """x [..., D]; `same_shape` tensors must match x's shape, `vectors` and `params` must be [D]; all on x's device.
    `same_shape` and `vectors` share x's dtype; `params` (a LayerNorm's weight and beta) share one dtype, x's or
    float32 (the fp32 parameters of mixed precision)."""
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim, got a scalar")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    d = x.shape[-1]
    same_shape, vectors, params = same_shape or {}, vectors or {}, params or {}
    for name, t in same_shape.items():
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
    for name, t in {**vectors, **params}.items():
        if t.shape != (d,):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected ({d},) (x's last dim)")
    for name, t in {**same_shape, **vectors}.items():
        check_like(op, name, t, x)
    check_params(op, params, x)


def check_like(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")


def check_params(op: str, params: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """A LayerNorm's weight and beta: on x's device, in x's dtype or float32, and one dtype for both."""
    first = None
    for name, t in params.items():
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if first is None:
            if t.dtype not in (x.dtype, torch.float32):
                raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; LayerNorm parameters must "
                                f"be in x's dtype or float32")
            first = name, t
        elif t.dtype != first[1].dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first[0]} has {first[1].dtype}; cast them to "
                            f"one dtype")


def sum_rows(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Column sums of grad [..., D] in fp32, returned as `dtype` [D]: the gradient of a broadcast bias."""
    return grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32).to(dtype)


def autocast_like(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under torch.autocast, the floating-point tensors cast to autocast's dtype, as autocast casts a matmul's
    inputs: the layer's activations arrive in bf16 from the autocast GEMMs while its weights stay fp32.
    Outside autocast the tensors are returned unchanged, and mixed dtypes are refused by the checks."""
    dtype = _autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def autocast_layer_norm(
    activations: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Under torch.autocast, a LayerNorm's activations (x, bias, residual) cast to autocast's dtype, while its
    parameters (weight, beta) stay float32 when they all are, as under PyTorch's autocast an nn.LayerNorm's do: their
    gradients are sums over every token, which overflow fp16 under a loss scale. Parameters of any other dtype
    are cast with the activations. Outside autocast everything is returned unchanged."""
    dtype = _autocast_dtype(activations[0])
    if dtype is None:
        return activations, params
    activations = tuple(t.to(dtype) if t.is_floating_point() else t for t in activations)
    if not all(t.dtype == torch.float32 for t in params):
        params = tuple(t.to(dtype) if t.is_floating_point() else t for t in params)
    return activations, params


def _autocast_dtype(first: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype for tensors on first's device, or None outside autocast."""
    device_type = first.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def row_limits() -> tuple[Limit, ...]:
    """The Triton row ops' limit: one program holds a row."""
    return (Limit(f"rows of at most {TRITON_MAX_ROW} elements", _row),)


def _row(t: torch.Tensor) -> str | None:
    d = t.shape[-1] if t.dim() else 1
    return None if d <= TRITON_MAX_ROW else f"rows of {d} elements > {TRITON_MAX_ROW} (one program holds a row)"


def layer_norm_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a LayerNorm kernel returns for x [..., D]: out like x, mean and rstd fp32 [rows], all new and contiguous."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.clone()


def layer_norm_backward_fake(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor):
    """What a LayerNorm backward returns: the input's gradient like x, grad_weight and grad_beta [D] in weight's
    dtype, grad_bias [D] in bias's."""
    d = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty((d,)), weight.new_empty((d,)), bias.new_empty((d,))


def with_bias_grad(kernel: str):
    """The C++ LayerNorm backward `kernel` (-> grad, grad_weight, grad_beta), adapted to the op's schema, which adds
    grad_bias: the input's gradient summed over rows (bias is the backward's third argument)."""

    def backward(*args):
        grad, grad_weight, grad_beta = getattr(torch.ops.mtbert_fast_C, kernel)(*args)
        return grad, grad_weight, grad_beta, sum_rows(grad, args[2].dtype)

    return backward


def layer_norm_backends(backward_kernel: str) -> dict[str, Backend]:
    """The backends of a LayerNorm op: the C++ kernels on cuda and cpu, their backward `backward_kernel` adapted to
    return grad_bias (with_bias_grad), and Triton's row kernels."""
    cpp_backward = with_bias_grad(backward_kernel)
    return {
        "cuda": Backend(backward=cpp_backward),
        "triton": Backend("forward", "backward", limits=row_limits()),
        "cpu": Backend(backward=cpp_backward, dtypes=CPU_DTYPES),
    }
