"""token_embeddings, a BERT embedding layer at the real tokens in one call, on every backend that runs here: against
the reference and against the embedding modules themselves, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import ops
from mtbert_fast.ops import reference
from op_testing import assert_close, num_threads, rand

OP_NAME = "token_embeddings"
VOCAB, POSITIONS, TYPES = 50, 16, 3


def _ids(shape, high, seed, dtype=torch.int64):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _tables(width, dtype, positions=True, types=True):
    return (rand(VOCAB, width, seed=1, dtype=dtype), rand(POSITIONS, width, seed=2, dtype=dtype) if positions else None,
            rand(TYPES, width, seed=3, dtype=dtype) if types else None)


def _slots(lengths, seqlen, left=False):
    """The slots of rows of these real lengths in a [len(lengths), seqlen] batch, padded on the right (or left)."""
    return torch.tensor([b * seqlen + (seqlen - n + i if left else i) for b, n in enumerate(lengths) for i in range(n)])


def _native(input_ids, indices, token_type_ids, word, position, token_type, weight, bias, eps):
    """What the embedding modules compute in word's dtype: (word + type) + position, then the LayerNorm."""
    flat = input_ids.reshape(-1).long()
    slots = indices if indices is not None else torch.arange(flat.numel())
    x = F.embedding(flat[slots], word)
    if token_type is not None:
        types = token_type_ids.reshape(-1)[slots].long() if token_type_ids is not None else torch.zeros_like(slots)
        x = x + F.embedding(types, token_type)
    if position is not None:
        x = x + F.embedding(slots % input_ids.shape[1], position)
    return F.layer_norm(x, (x.shape[1],), weight.to(word.dtype), None if bias is None else bias.to(word.dtype), eps)


@pytest.mark.parametrize("case", ["right_padded", "left_padded", "no_padding", "one_token"])
@pytest.mark.parametrize("width", [40, 64])
@pytest.mark.parametrize("parts", ["all", "no_types_given", "no_type_table", "no_positions", "no_bias"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("fp32_norm", [False, True])
def test_kernel_against_the_reference(backend, dtype, case, width, parts, id_dtype, fp32_norm):
    """Ragged rows padded either side, no padding (indices None), a single token; widths with and without a tail
    of a vector; each optional table and the bias left out; int32 ids; the LayerNorm's parameters in fp32."""
    lengths, seqlen = {"right_padded": ([5, 1, 12], 12), "left_padded": ([3, 7], 9), "no_padding": ([6, 6], 6),
                       "one_token": ([1], 1)}[case]
    batch = len(lengths)
    input_ids = _ids((batch, seqlen), VOCAB, 4, id_dtype)
    indices = None if case in ("no_padding", "one_token") else _slots(lengths, seqlen, left=case == "left_padded")
    token_type_ids = None if parts == "no_types_given" else _ids((batch, seqlen), TYPES, 5, id_dtype)
    word, position, token_type = _tables(width, dtype, positions=parts != "no_positions",
                                         types=parts != "no_type_table")
    norm_dtype = torch.float32 if fp32_norm else dtype
    weight = 1 + rand(width, seed=6, scale=0.1, dtype=norm_dtype)
    bias = None if parts == "no_bias" else rand(width, seed=7, scale=0.1, dtype=norm_dtype)
    args = (input_ids, indices, token_type_ids, word, position, token_type, weight, bias, 1e-12)
    out = backend.forward(*backend.to(*args))
    rows = sum(lengths) if indices is not None else batch * seqlen
    assert out.dtype == dtype and out.shape == (rows, width)
    f32 = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    assert_close(out.cpu(), reference.token_embeddings(*f32), _native(*args), dtype, atol=2e-6, rtol=2e-6)


def test_the_encoders_embeddings_exactly_in_fp32(backend):
    """In fp32 the kernel adds the rows in the modules' order, so it meets nn.Embedding + nn.LayerNorm within the
    LayerNorm's own rounding."""
    word, position, token_type = _tables(64, torch.float32)
    norm = torch.nn.LayerNorm(64, eps=1e-12)
    with torch.no_grad():
        norm.weight.copy_(1 + rand(64, seed=8, scale=0.1))
        norm.bias.copy_(rand(64, seed=9, scale=0.1))
    input_ids, token_type_ids = _ids((2, 10), VOCAB, 10), _ids((2, 10), TYPES, 11)
    with torch.inference_mode():
        modules = norm(word[input_ids] + token_type[token_type_ids] + position[torch.arange(10)]).reshape(20, 64)
        out = backend.forward(*backend.to(input_ids, None, token_type_ids, word, position, token_type, norm.weight,
                                          norm.bias, 1e-12))
    torch.testing.assert_close(out.cpu(), modules, atol=2e-6, rtol=0)


def test_rows_split_over_threads_give_one_threads_bits():
    """A batch above the size the CPU kernel splits over threads (about 128K elements) gives bitwise the rows of one
    thread."""
    word, position, token_type = _tables(384, torch.bfloat16)
    weight, bias = 1 + rand(384, seed=6, scale=0.1), rand(384, seed=7, scale=0.1)
    input_ids, token_type_ids = _ids((40, POSITIONS), VOCAB, 12), _ids((40, POSITIONS), TYPES, 13)
    outs = []
    for n in (1, 2):
        with num_threads(n):
            outs.append(ops.token_embeddings(input_ids, None, token_type_ids, word, position, token_type, weight,
                                             bias, 1e-12, backend="cpu"))
    assert outs[0].shape == (40 * POSITIONS, 384)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("bad,message", [
    ("input_id", r"input_ids\[1, 2\] = 50 is outside the table's 50 rows"),
    ("negative_id", r"input_ids\[0, 4\] = -1 is outside the table's 50 rows"),
    ("type", r"token_type_ids\[1, 0\] = 3 is outside the table's 3 rows"),
    ("index", r"indices\[3\] = 24 is outside the 2 x 12 input_ids"),
    ("position", r"input_ids has 17 columns but the position table only 16 rows"),
])
def test_an_id_outside_its_table_is_named(backend, bad, message):
    """Every lookup is checked before a row is written: the id, its place and the table's size in the message."""
    seqlen = 17 if bad == "position" else 12
    input_ids, token_type_ids = _ids((2, seqlen), VOCAB, 12), _ids((2, seqlen), TYPES, 13)
    indices = torch.tensor([0, 1, 12, 14])
    if bad == "input_id":
        input_ids[1, 2] = VOCAB
    elif bad == "negative_id":
        input_ids[0, 4] = -1
        indices = torch.tensor([4, 12])
    elif bad == "type":
        token_type_ids[1, 0] = TYPES
    elif bad == "index":
        indices[3] = 24
    word, position, token_type = _tables(8, torch.float32)
    with pytest.raises(ValueError, match=message):
        ops.token_embeddings(*backend.to(input_ids, indices, token_type_ids, word, position, token_type,
                                         torch.ones(8), torch.zeros(8)), backend=backend.name)


@pytest.mark.parametrize("bad,message", [
    ("negative_id", r"token_embeddings: input_ids hold values outside \[0, 50\)"),
    ("type", r"token_embeddings: token_type_ids hold values outside \[0, 3\)"),
    ("negative_index", r"token_embeddings: indices\[1\] = -1 is out of range for input_ids of 24 slots"),
])
def test_reference_refuses_what_the_kernels_refuse(bad, message):
    """Python's indexing would wrap a negative id or slot around; the reference refuses them as the kernels do."""
    input_ids, token_type_ids = _ids((2, 12), VOCAB, 12), _ids((2, 12), TYPES, 13)
    indices = torch.tensor([0, 1, 12, 14])
    if bad == "negative_id":
        input_ids[0, 1] = -1
    elif bad == "type":
        token_type_ids[1, 0] = TYPES
    else:
        indices[1] = -1
    word, position, token_type = _tables(8, torch.float32)
    with pytest.raises(ValueError, match=message):
        ops.token_embeddings(input_ids, indices, token_type_ids, word, position, token_type, torch.ones(8),
                             torch.zeros(8), backend="reference")


def _good():
    word, position, token_type = _tables(8, torch.float32)
    return dict(input_ids=_ids((2, 5), VOCAB, 14), indices=torch.tensor([0, 5, 6]),
                token_type_ids=_ids((2, 5), TYPES, 15), word=word, position=position, token_type=token_type,
                weight=torch.ones(8), bias=torch.zeros(8))


@pytest.mark.parametrize("change,message", [
    (dict(input_ids=torch.zeros(10, dtype=torch.int64)), r"input_ids must be \[batch, seqlen\] int64 or int32"),
    (dict(input_ids=torch.zeros(2, 5)), r"input_ids must be \[batch, seqlen\] int64 or int32"),
    (dict(token_type_ids=torch.zeros(2, 5, dtype=torch.int32)), "token_type_ids must have input_ids' shape"),
    (dict(token_type_ids=torch.zeros(5, 2, dtype=torch.int64)), "token_type_ids must have input_ids' shape"),
    (dict(indices=torch.tensor([0, 5], dtype=torch.int32)), "indices must be a 1-D int64 tensor"),
    (dict(word=torch.zeros(VOCAB, 8, dtype=torch.int64)), "word must be a .* floating-point table"),
    (dict(position=torch.zeros(POSITIONS, 6)), r"position must be a \[rows, 8\] table of word's dtype"),
    (dict(token_type=torch.zeros(TYPES, 8, dtype=torch.bfloat16)), "token_type must be a .* table of word's dtype"),
    (dict(weight=torch.ones(6)), "weight must be a vector of 8 elements"),
    (dict(bias=torch.zeros(8, dtype=torch.float64)), "bias must be a vector of 8 elements in word's dtype or float32"),
    (dict(indices=torch.tensor([0, 5], device="meta")), "indices is on meta but word is on cpu"),
])
def test_bad_arguments_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        ops.token_embeddings(**{**_good(), **change})


def test_a_table_that_needs_its_gradient_is_refused():
    """The kernel has no backward: a table that asks for a gradient is an error, not a result without one."""
    args = _good()
    args["word"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="token_embeddings runs inference only"):
        ops.token_embeddings(**args)
    with torch.no_grad():
        assert ops.token_embeddings(**args).shape == (3, 8)
