"""Fixtures of the op tests: `backend`, each backend of the module's op (OP_NAME) that runs here (with a
`dtype` argument not parametrized otherwise: each dtype that backend takes; an `approximate` argument takes the
module's APPROXIMATE), or with an `op_name` argument each
(op, backend) pair of the registry; see op_testing.py."""

from __future__ import annotations

import os

import pytest
import torch

from mtbert_fast import _ext
from mtbert_fast.ops import registry
from op_testing import runners


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter_cases(**values): under Triton's interpreter, run only the cases whose named "
        "parameters take these values (the others are deselected: the interpreter is slow)"
    )


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    if "op_name" in metafunc.fixturenames:
        pairs = [(name, r) for name in sorted(registry.OPS) for r in runners(name)]
        metafunc.parametrize(("op_name", "backend"), pairs, indirect=["backend"],
                             ids=[f"{name}-{r.id}" for name, r in pairs])
        return
    if "approximate" in metafunc.fixturenames and not _parametrized(metafunc, "approximate"):
        metafunc.parametrize("approximate", metafunc.module.APPROXIMATE)
    found = runners(metafunc.module.OP_NAME)
    if "dtype" in metafunc.fixturenames and not _parametrized(metafunc, "dtype"):
        pairs = [(r, d) for r in found for d in r.dtypes]
        metafunc.parametrize(("backend", "dtype"), pairs, indirect=["backend"],
                             ids=[f"{r.id}-{str(d).replace('torch.', '')}" for r, d in pairs])
        return
    metafunc.parametrize("backend", found, indirect=True, ids=[r.id for r in found])


def _parametrized(metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if name in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("interpreter_cases")
        params = getattr(getattr(item, "callspec", None), "params", {})
        runner = params.get("backend")
        if marker and runner is not None and runner.interpreted and any(
            params.get(k) not in v for k, v in marker.kwargs.items()
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def backend(request, monkeypatch):
    """A Runner: its kernels must be there (a missing build fails); Triton on CPU tensors runs interpreted."""
    runner = request.param
    if runner.name in ("cpu", "cuda"):
        if os.environ.get("MTBERT_FAST_SKIP_BUILD") == "1":
            pytest.skip("pure-Python install requested: no compiled kernels")
        assert _ext.loaded(), _ext.load_error
        assert _ext.has_kernel(runner.op_name, runner.name.upper()), f"no {runner.name} kernel for {runner.op_name}"
    if runner.interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return runner
