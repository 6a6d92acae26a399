"""The Triton backend: one file per kernel, each a torch.library custom op ("mtbert_fast::triton_<op>", with a fake
implementation and its backward registered as autograd) plus the plain function the op wrappers call; for
attention_varlen also the plain backward ("attention_varlen_backward"), which the CUDA op's autograd runs after a
CUDA forward (dispatch.backward_backend).

Importing this package fills `mtbert_fast.ops.dispatch.triton_kernels`; dispatch.py imports it lazily, the first time
the Triton backend is considered.  The kernels run compiled on CUDA tensors, and on CPU tensors through Triton's
interpreter when TRITON_INTERPRET=1 at launch time (see _jit.py): that is how the tests check them.

Custom ops rather than torch.library.triton_op: a triton_op's fake implementation is its Python body, which cannot
run on fake tensors here (mlm_gather_loss gathers a data-dependent number of rows; under TRITON_INTERPRET=1
wrap_triton hands back the interpreter, which needs real data), while an opaque custom op with a fake
implementation traces under torch.compile(fullgraph=True) on every device.
"""

from mtbert_fast.ops import dispatch
from mtbert_fast.ops.triton.attention_varlen import attention_varlen, attention_varlen_backward
from mtbert_fast.ops.triton.bias_gelu import bias_gelu
from mtbert_fast.ops.triton.bias_gelu_layer_norm import bias_gelu_layer_norm
from mtbert_fast.ops.triton.bias_residual_layer_norm import bias_residual_layer_norm
from mtbert_fast.ops.triton.mlm_gather_loss import mlm_gather_loss

KERNELS = {
    "attention_varlen": attention_varlen,
    "attention_varlen_backward": attention_varlen_backward,
    "bias_gelu": bias_gelu,
    "bias_gelu_layer_norm": bias_gelu_layer_norm,
    "bias_residual_layer_norm": bias_residual_layer_norm,
    "mlm_gather_loss": mlm_gather_loss,
}

dispatch.triton_kernels.update(KERNELS)

__all__ = list(KERNELS)
