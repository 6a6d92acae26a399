"""The CPU kernels built for each instruction set: each one, loaded alone through $MTBERT_FAST_CPU_ISA in a fresh
process, runs every C++ CPU op in agreement with the PyTorch references (tests/isa_parity.py states the
tolerances), and the process reports the instruction set it was asked for. AVX-512 runs where the CPU has it.
Also: an instruction set the CPU or the build lacks is refused with a reason, and nothing is loaded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from mtbert_fast import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not _ext.loaded(), reason=f"extension not loaded: {_ext.load_error}")


def _run(script: list[str], isa: str) -> dict:
    env = dict(os.environ, **{_ext.ISA_ENV: isa})
    proc = subprocess.run([sys.executable, *script], env=env, capture_output=True, text=True, timeout=180, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", _ext.ISAS)
def test_isa_build_matches_reference(isa):
    if isa not in _ext.built_isas():
        pytest.skip(f"this build has no {isa} CPU kernels (built: {_ext.built_isas()})")
    if isa not in _ext.supported_isas():
        pytest.skip(f"this CPU does not run {isa}")
    report = _run([os.path.join(HERE, "isa_parity.py")], isa)
    assert report["load_error"] is None
    assert report["isa"] == isa
    assert report["libs"] == ["_C", f"_C_cpu_{isa}"]
    assert len(report["passed"]) == 2 * 22 + 1, report["passed"]


REPORT = "import json; from mtbert_fast import _ext; print(json.dumps([_ext.cpu_isa(), _ext.load_error]))"


def test_unknown_isa_is_refused():
    isa, error = _run(["-c", REPORT], "sse9")
    assert isa is None
    assert error == f"${_ext.ISA_ENV}=sse9: expected one of default, avx2, avx512"


def test_isa_the_cpu_lacks_is_refused():
    lacking = [isa for isa in _ext.built_isas() if isa not in _ext.supported_isas()]
    if not lacking:
        pytest.skip("this CPU runs every instruction set built")
    isa, error = _run(["-c", REPORT], lacking[0])
    assert isa is None
    assert f"{_ext.ISA_ENV}={lacking[0]}: this CPU lacks it" in error


@pytest.mark.parametrize("text,want", [
    ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", "GenuineIntel"),
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\n", "AuthenticAMD"),
    ("processor\t: 0\nFeatures\t: fp asimd\n", None),  # no vendor_id line (aarch64)
    (None, None),  # no /proc/cpuinfo
])
def test_cpu_vendor_reads_vendor_id(text, want, monkeypatch):
    def fake_open(path, *args, **kwargs):
        if text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)

    monkeypatch.setattr(_ext, "open", fake_open, raising=False)
    assert _ext._cpu_vendor() == want
