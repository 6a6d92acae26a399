"""The Triton backend: one module per op, named as the op, holding its kernels and the plain functions `forward`
and `backward` that launch them, with the arguments and outputs of the op's schema (mtbert_fast/ops/registry.py).
The op's declaration names them; nothing here registers anything, and nothing here imports the dispatch.

The kernels run compiled on CUDA tensors, and on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 at
launch time (see _jit.py): that is how the tests check them. The dispatch imports this package the first time it
considers the Triton backend.
"""
