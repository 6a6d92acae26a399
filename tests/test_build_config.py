"""The build's choices that need no compiler: the torch requirement the PEP 517 backend adds, and the CPU kernel
builds setup.py compiles (MTBERT_FAST_BUILD_ISAS)."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend():
    spec = importlib.util.spec_from_file_location("mtbert_fast_backend",
                                                  ROOT / "build_backend" / "mtbert_fast_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("wanted, requirement", [("2.13.0", "torch==2.13.0"), (" 2.14.1 ", "torch==2.14.1"),
                                                 ("torch==2.13.0+cpu", "torch==2.13.0+cpu")])
def test_build_torch_named_by_the_environment(backend, monkeypatch, wanted, requirement):
    monkeypatch.setenv("MTBERT_FAST_BUILD_TORCH", wanted)
    assert backend.torch_requirement() == requirement
    assert backend.get_requires_for_build_wheel()[-1] == requirement
    assert backend.get_requires_for_build_editable()[-1] == requirement


def test_build_torch_is_the_installed_one(backend, monkeypatch):
    """Unset, the requirement pins the torch of the interpreter's own environment (the one pip installs into)."""
    monkeypatch.delenv("MTBERT_FAST_BUILD_TORCH", raising=False)
    assert backend.torch_requirement() == f"torch=={importlib.metadata.version('torch')}"


def _setup_function(name):
    """A function of setup.py with the module-level names it reads (importing setup.py would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name
            or isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "CPU_ISA_FLAGS" for t in n.targets)]
    names = {"os": os, "platform": platform, "sys": sys}
    exec(compile(ast.Module(keep, type_ignores=[]), "setup.py", "exec"), names)
    return names[name]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 builds three ISAs")
@pytest.mark.parametrize("wanted, built", [(None, ["default", "avx2", "avx512"]), ("", ["default", "avx2", "avx512"]),
                                           ("avx512", ["avx512"]), ("avx512, default", ["default", "avx512"]),
                                           ("avx2,avx2", ["avx2"])])
def test_build_isas(monkeypatch, wanted, built):
    if wanted is None:
        monkeypatch.delenv("MTBERT_FAST_BUILD_ISAS", raising=False)
    else:
        monkeypatch.setenv("MTBERT_FAST_BUILD_ISAS", wanted)
    assert _setup_function("cpu_isas")() == built


@pytest.mark.parametrize("wanted", ["avx9", "avx2,sse", ",", "AVX2"])
def test_unknown_build_isa_is_refused_by_name(monkeypatch, wanted):
    monkeypatch.setenv("MTBERT_FAST_BUILD_ISAS", wanted)
    with pytest.raises(SystemExit, match=r"MTBERT_FAST_BUILD_ISAS=.*name one or more of default, avx2, avx512"):
        _setup_function("cpu_isas")()


def test_other_machines_build_the_baseline_only(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("MTBERT_FAST_BUILD_ISAS", raising=False)
    cpu_isas = _setup_function("cpu_isas")
    assert cpu_isas() == ["default"]
    monkeypatch.setenv("MTBERT_FAST_BUILD_ISAS", "default")
    assert cpu_isas() == ["default"]
    monkeypatch.setenv("MTBERT_FAST_BUILD_ISAS", "default,avx2")
    with pytest.raises(SystemExit, match="aarch64 builds the default kernels only"):
        cpu_isas()
