"""python -m mtbert_fast.info: the report names every op and backend and says why a backend is not used."""

from __future__ import annotations

import torch

from mtbert_fast import _ext, info, ops
from mtbert_fast.ops import dispatch, registry


def test_report_names_every_op_and_backend(capsys, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    info.main()
    text = capsys.readouterr().out
    for name, op in registry.OPS.items():
        assert name in text and op.schema in text
    for backend in dispatch.BACKENDS:
        assert backend in text
    assert torch.__version__ in text
    assert torch.backends.cpu.get_cpu_capability() in text
    assert "$MTBERT_FAST_BACKEND" in text and "$TRITON_INTERPRET" in text
    if not _ext.loaded():
        assert _ext.load_error in text


def test_every_row_has_a_usable_backend_or_a_reason():
    footnotes: dict[str, int] = {}
    rows = info.backend_rows(footnotes)
    assert len(rows) == len(registry.OPS) * len(info.devices()) * len(info.DTYPES)
    for row in rows:
        auto, cells = row[3], row[4:]
        assert row[-1] == "yes", "the reference runs every op on every device"
        assert auto in dispatch.BACKENDS
        assert cells[dispatch.BACKENDS.index(auto)] == "yes"
        for cell in cells:
            assert cell == "yes" or int(cell.strip("[]")) in footnotes.values()


def test_report_lists_choices_made_in_the_process(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    ops.bias_gelu(torch.randn(3, 8), torch.zeros(8))
    text = info.report()
    assert "none yet" not in text
    assert "Automatic choices made in this process:" in text


def test_bad_backend_variable_is_reported_not_raised(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    assert "'fastest' is not a backend" in info.report()


def test_report_prints_every_declared_input_limit():
    text = info.report()
    assert "Input limits" in text
    limits = [lim for op in registry.OPS.values() for b in op.backends.values() for lim in b.limits]
    assert limits
    for lim in limits:
        assert lim.text in text
