"""The pure parts of the scripts under benchmarks/ (the timing itself is a benchmark, not a test)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def full_batch_profile():
    return _script("full_batch_profile")


@pytest.mark.parametrize(
    "node_type, node_name, part",
    [
        ("FullyConnected", "__module.encoder.layer.0.output.dense/aten::linear/Add", "linears"),
        ("Subgraph", "__module.encoder.layer.0.attention.self/aten::scaled_dot_product_attention/SDPA", "attention"),
        ("Subgraph", "__module.encoder.layer.0.intermediate/aten::gelu/Gelu", "rest"),
        ("Transpose", "Transpose_15007", "attention"),
        ("MVN", "__module.encoder.layer.0.output.LayerNorm/aten::layer_norm/MVN", "layernorm"),
        ("MulAdd", "__module.encoder.layer.0.output.LayerNorm/aten::layer_norm/Multiply_1", "layernorm"),
        ("Add", "__module.encoder.layer.0.output/aten::add/Add", "rest"),
        ("Gather", "__module.embeddings.word_embeddings/aten::embedding/Gather", "rest"),
    ],
)
def test_openvino_nodes_fall_into_the_encoders_parts(full_batch_profile, node_type, node_name, part):
    assert full_batch_profile.openvino_part(node_type, node_name) == part


def test_openvino_part_times_average_over_runs(full_batch_profile):
    def run(scale):
        return [
            ("FullyConnected", "q", "gemm_mlas_f32", 2.0 * scale),
            ("FullyConnected", "k", "gemm_mlas_f32", 3.0 * scale),
            ("FullyConnected", "ffn", "brgemm_avx2_f32", 10.0 * scale),
            ("Subgraph", "self/aten::scaled_dot_product_attention/x", "jit_avx2_f32", 4.0 * scale),
            ("MVN", "LayerNorm/MVN", "jit_avx2_f32", 1.0 * scale),
            ("Add", "output/aten::add/Add", "jit_avx2_f32", 0.5 * scale),
        ]

    parts, kernels = full_batch_profile.openvino_part_times([run(1.0), run(3.0)])
    assert parts == pytest.approx({"linears": 30.0, "attention": 8.0, "layernorm": 2.0, "rest": 1.0})
    assert kernels.keys() == {"gemm_mlas_f32", "brgemm_avx2_f32"}
    assert kernels["gemm_mlas_f32"][0] == 2 and kernels["gemm_mlas_f32"][1] == pytest.approx(10.0)
    assert kernels["brgemm_avx2_f32"][0] == 1 and kernels["brgemm_avx2_f32"][1] == pytest.approx(20.0)


def test_cores_busy_is_cpu_time_over_wall_time(full_batch_profile):
    # fake clocks that only fn moves: each call adds 2 s of wall time and 3 s of CPU time
    state = {"wall": 0.0, "cpu": 0.0}

    def fn():
        state["wall"] += 2.0
        state["cpu"] += 3.0

    busy = full_batch_profile.cores_busy(fn, calls=4, wall=lambda: state["wall"], cpu=lambda: state["cpu"])
    assert busy == pytest.approx(1.5)


@pytest.mark.parametrize("route", ["panels", "mkl", "onednn"])
def test_profile_parts_count_every_linear_route(full_batch_profile, route, monkeypatch):
    """The profile's parts find the encoder's linears on each of its routes (panel_linear, MKL's packed sgemm,
    oneDNN's linear) under "linears", none of them in "rest"."""
    import torch
    from transformers import BertConfig, BertModel

    from mtbert_fast import FastBertModel
    from mtbert_fast.models import encoder
    from mtbert_fast.ops.mkl_linear import available as mkl_available

    if route == "mkl" and not mkl_available():
        pytest.skip("this PyTorch has no MKL")
    panel_rows, mkl_rows = (1 << 30 if route == "panels" else 0), (1 << 30 if route == "mkl" else 0)
    monkeypatch.setattr(encoder, "panel_rows", lambda dtype, *weight: panel_rows)
    monkeypatch.setattr(encoder, "mkl_rows", lambda dtype, *weight: mkl_rows)
    torch.manual_seed(0)
    hf = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              vocab_size=1100)).eval()
    fast = FastBertModel.from_hf(hf)
    with torch.profiler.profile() as prof, torch.inference_mode():
        fast(**full_batch_profile.full_batch(hf.config, 2, 8))
    linear_ops = {"panels": "mtbert_fast_C::panel_linear", "mkl": "mtbert_fast_C::mkl_linear",
                  "onednn": "mkldnn::_linear_pointwise"}
    assert linear_ops[route] in {e.key for e in prof.key_averages()}
    assert full_batch_profile.PARTS[linear_ops[route]] == "linears"
    assert full_batch_profile.part_times(fast, full_batch_profile.full_batch(hf.config, 2, 8), runs=1)["linears"] > 0


def test_products_alone_are_the_layers_linears_and_the_gelu_free_ffn_input(full_batch_profile):
    """products_alone: the layer's four products (the FFN's input product twice, with and without GELU), whose FLOPs
    are one layer's share of linear_flops; each with GELU matches the encoder's linear, without it the plain product."""
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertModel

    from mtbert_fast import FastBertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=1100)
    fast = FastBertModel.from_hf(BertModel(config).eval())
    tokens = 6
    products = full_batch_profile.products_alone(fast, tokens)
    assert list(products) == ["QKV", "attention output", "FFN in + GELU", "FFN in, bias only", "FFN out"]
    layer_flops = sum(flops for name, (_, flops) in products.items() if name != "FFN in, bias only")
    calls = full_batch_profile.PRODUCT_CALLS
    expected = (full_batch_profile.linear_flops(config, tokens, 1) - 2 * config.hidden_size ** 2) / 2
    assert layer_flops == calls * expected
    assert products["FFN in + GELU"][1] == products["FFN in, bias only"][1]
    with torch.inference_mode():
        with_gelu = products["FFN in + GELU"][0]()
        plain = products["FFN in, bias only"][0]()
    assert len(with_gelu) == len(plain) == calls
    assert not torch.equal(with_gelu[0], plain[0])
    torch.testing.assert_close(with_gelu[0], F.gelu(plain[0]), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def panel_rows():
    return _script("panel_rows")


@pytest.fixture
def small_fast():
    """A FastBertModel of one small random BERT layer."""
    import torch
    from transformers import BertConfig, BertModel

    from mtbert_fast import FastBertModel

    torch.manual_seed(0)
    hf = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              vocab_size=1100)).eval()
    return FastBertModel.from_hf(hf)


def test_panel_rows_products_cover_the_layer(panel_rows):
    """One layer's four products and their sum, each panel_linear's speed over oneDNN's: positive ratios."""
    import torch

    ratios = panel_rows.products(torch.float32, 32, 3, repeats=1)
    assert set(ratios) == {"qkv", "attn_out", "ffn_in", "ffn_out", "layer"}
    assert all(r > 0 for r in ratios.values())


def test_panel_rows_forwards_put_the_row_limit_back(panel_rows, small_fast):
    """Timing the encoder at two row limits leaves the limit and the cached routes as they were."""
    import torch

    module = panel_rows.panel_module
    before = {isa: dict(rows) for isa, rows in module.MAX_ROWS.items()}
    limit, amx_limits = module.encoder_rows(torch.float32), (module.AMX_BF16_ROWS, module.AMX_BF16_NARROW_ROWS)
    of_medians, per_round = panel_rows.forwards(small_fast, torch.float32, 5, (0, 8), repeats=1)
    assert of_medians > 0 and per_round > 0
    assert module.MAX_ROWS == before and module.encoder_rows(torch.float32) == limit
    assert (module.AMX_BF16_ROWS, module.AMX_BF16_NARROW_ROWS) == amx_limits


def test_panel_rows_forwards_take_a_batch_of_sequences(panel_rows, small_fast, monkeypatch):
    """--batch: the forwards run that many sequences of the length, under the limits given for their token count."""
    import torch

    made = []
    full_batch = panel_rows.fbp.full_batch
    monkeypatch.setattr(panel_rows.fbp, "full_batch", lambda *a: made.append(a[1:]) or full_batch(*a))
    of_medians, per_round = panel_rows.forwards(small_fast, torch.float32, 5, (8, 16), repeats=1, sequences=2)
    assert made == [(2, 5)] and of_medians > 0 and per_round > 0


def test_panel_rows_walks_put_the_switch_back(panel_rows, small_fast, panel_fetch_kept):
    """Timing forwards on whole panels and on chunks fetched ahead leaves ops.panel_fetch() as it was, either way."""
    from mtbert_fast import _ext, ops

    loaded = _ext.has_kernel("panel_linear", "CPU")
    for setting in (False, True):
        ops.panel_fetch(setting)
        of_medians, per_round = panel_rows.walks(small_fast, 5, repeats=1)
        assert of_medians > 0 and per_round > 0
        assert ops.panel_fetch() is (setting and loaded)


@pytest.fixture(scope="module")
def mkl_rows():
    return _script("mkl_rows")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mkl_rows_products_cover_the_layer(mkl_rows, dtype):
    """One layer's four products, each with oneDNN's, MKL's and the panels' rates: positive."""
    if not mkl_rows.mkl_module.available():
        pytest.skip("this PyTorch has no MKL")
    rates = mkl_rows.products(32, 3, mkl_rows.DTYPES[dtype], repeats=1)
    assert set(rates) == {"qkv", "attn_out", "ffn_in", "ffn_out"}
    assert all(set(r) == {"onednn", "mkl", "panels"} and min(r.values()) > 0 for r in rates.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mkl_rows_forwards_put_the_routes_back(mkl_rows, dtype):
    """Timing the encoder on each route leaves the encoder's routes as they were."""
    import torch
    from transformers import BertConfig, BertModel

    from mtbert_fast import FastBertModel
    from mtbert_fast.models import encoder

    if not mkl_rows.mkl_module.available():
        pytest.skip("this PyTorch has no MKL")
    torch.manual_seed(0)
    hf = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              vocab_size=1100)).eval()
    routes = encoder.panel_rows, encoder.mkl_rows
    fast = FastBertModel.from_hf(hf).to(mkl_rows.DTYPES[dtype])
    ratios = mkl_rows.forwards(fast, 2, 16, repeats=1)
    assert set(ratios) == {"onednn", "panels"}
    assert all(a > 0 and b > 0 for a, b in ratios.values())
    assert (encoder.panel_rows, encoder.mkl_rows) == routes


def test_int8_panels_products_at_bert_large_shapes(capsys):
    """bert-large's four product shapes (its FFN output reads rows of 4 KiB): the script's check that the panels' sums
    equal oneDNN's int8 product holds, and each shape gets its line."""
    int8_panels = _script("int8_panels")
    int8_panels.products("bert-large", [1, 9], repeats=1)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines] == [
        "bert-large [3072, 1024", "bert-large [1024, 1024", "bert-large [4096, 1024", "bert-large [1024, 4096"]


def test_one_pass_inputs_compares_against_the_per_op_path_and_restores_it():
    """benchmarks/one_pass_inputs.py's per-op side: inside PerOpPath the encoder reads the mask by tensor ops and
    embeds op by op; after it, the one-pass steps are back."""
    import torch

    from mtbert_fast.models import encoder

    one_pass = _script("one_pass_inputs")
    saved = encoder._packed_mask, encoder._one_call_embeddings
    mask = torch.tensor([[1, 1, 0]])
    with one_pass.PerOpPath():
        assert encoder._packed_mask(mask, None) is None
        assert encoder._one_call_embeddings() is False
    assert (encoder._packed_mask, encoder._one_call_embeddings) == saved


def test_tile_rows_times_both_routes_of_each_product():
    """benchmarks/tile_rows.py: oneDNN's time over panel_linear's for a layer's products, per row count (on any CPU
    whose oneDNN multiplies bf16; the script itself runs only where panel_linear's bf16 runs on AMX tiles)."""
    import torch

    from mtbert_fast.models.weight_pack import onednn_dtype

    if onednn_dtype(torch.bfloat16) != torch.bfloat16:
        pytest.skip("oneDNN does not multiply bfloat16 on this CPU")
    script = _script("tile_rows")
    assert set(script.products(32)) == {"qkv", "attn_out", "ffn_in", "ffn_out"}
    g = torch.Generator().manual_seed(0)
    for k, n, gelu in script.products(32).values():
        got = script.ratios(k, n, gelu, [3, 17], repeats=1, g=g)
        assert set(got) == {3, 17} and all(r > 0 for r in got.values())


def test_tile_rows_forwards_put_the_limits_back():
    """benchmarks/tile_rows.py --forwards: timing the encoder with the wider row limits lowered and as they are leaves
    them, and the cached routes, as they were."""
    import torch
    from transformers import BertConfig, BertModel

    from mtbert_fast import FastBertModel

    script = _script("tile_rows")
    module = script.panel_module
    torch.manual_seed(0)
    hf = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              vocab_size=1100)).eval()
    fast = FastBertModel.from_hf(hf, dtype=torch.bfloat16)
    before = {name: getattr(module, name) for name in script.WIDER_LIMITS}
    rows = module.encoder_rows(torch.bfloat16, 32, 64, True)
    of_medians, per_round = script.forwards(fast, 2, 8, repeats=1)
    assert of_medians > 0 and per_round > 0
    assert {name: getattr(module, name) for name in script.WIDER_LIMITS} == before
    assert module.encoder_rows(torch.bfloat16, 32, 64, True) == rows


@pytest.mark.parametrize("rows, most, block", [(1024, 384, 342), (384, 384, 384), (385, 384, 193), (100, 384, 100)])
def test_onednn_rows_splits_into_equal_blocks(rows, most, block):
    """benchmarks/onednn_rows.py: the equal blocks of at most `most` rows, as the encoder's onednn_row_block makes
    them."""
    assert _script("onednn_rows").blocks(rows, most) == block


def test_eval_autograd_shapes_are_batch_by_length():
    import argparse

    script = _script("eval_autograd")
    assert script.parse_shape("8x128") == (8, 128) and script.parse_shape("1X16") == (1, 16)
    for bad in ("8", "8x", "0x16", "axb"):
        with pytest.raises(argparse.ArgumentTypeError, match="BATCHxLENGTH|positive"):
            script.parse_shape(bad)


def test_eval_autograd_steps_write_every_layer_weight_before_the_call():
    import torch

    script = _script("eval_autograd")
    model = torch.nn.Module()
    model.head = torch.nn.Linear(2, 2)
    model.encoder = torch.nn.Module()
    model.encoder.layer = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    start = [p._version for p in model.parameters()]
    seen = []
    run = script.stepped(model, lambda: seen.append([p._version for p in model.parameters()]))
    run()
    run()
    assert seen[0][:2] == seen[1][:2] == start[:2]  # the head is left alone
    assert all(s < a < b for s, a, b in zip(start[2:], seen[0][2:], seen[1][2:]))


def test_cpu_peak_times_the_panels():
    """cpu_peak's panel_linear rate: a positive GFLOP/s where the CPU kernels are loaded, None where they are not."""
    from mtbert_fast import _ext

    rate = _script("cpu_peak").panel_rate(rows=4)
    assert (rate is None) == (not _ext.has_kernel("panel_linear", "CPU"))
    assert rate is None or rate > 0
