"""The build records what it compiled against, and the extension is not loaded under another torch: a fresh
process whose torch reports a different version gets one warning that names both versions and the rebuild
command, an unloaded extension with that reason in load_error, and a working import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mtbert_fast import _ext

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason=f"extension not loaded: {_ext.load_error}")

MISMATCH = """
import json, warnings
import torch
torch.__version__ = "1.0.0+other"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mtbert_fast
    from mtbert_fast import _ext
    import mtbert_fast.ops
libs = [p for p in torch.ops.loaded_libraries if "mtbert_fast" in p]
print(json.dumps({"warnings": [(w.category.__name__, str(w.message)) for w in caught], "libs": libs,
                  "loaded": _ext.loaded(), "load_error": _ext.load_error}))
"""


def test_build_info_describes_this_build():
    info = _ext.build_info
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["cuda_kernels"] == _ext.built_with_cuda()
    assert _ext.cpu_isa() in info["cpu_isas"]
    assert "default" in info["cpu_isas"]


def test_other_torch_is_refused_with_one_warning():
    proc = subprocess.run([sys.executable, "-c", MISMATCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    mismatch = [msg for category, msg in report["warnings"] if category == "BuildMismatchWarning"]
    assert len(mismatch) == 1, report["warnings"]
    assert mismatch[0] == _ext.mismatch_message(torch.__version__, "1.0.0+other")
    assert f"built against torch {torch.__version__}, but torch 1.0.0+other is running" in mismatch[0]
    assert _ext.REBUILD_COMMAND in mismatch[0]
    assert report["libs"] == []
    assert not report["loaded"]
    assert report["load_error"] == mismatch[0]
