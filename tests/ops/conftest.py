"""Fixtures of the op tests."""

from __future__ import annotations

import os

import pytest
import torch

from mtbert_fast import _ext


@pytest.fixture(scope="session")
def compiled_kernels():
    """The CPU kernels of the package's built extension (torch.ops.mtbert_fast_C); a missing build fails the test."""

    def require(names: list[str]):
        if os.environ.get("MTBERT_FAST_SKIP_BUILD") == "1":
            pytest.skip("pure-Python install requested: no compiled kernels")
        assert _ext.loaded(), _ext.load_error
        missing = [name for name in names if not _ext.has_kernel(name, "CPU")]
        assert not missing, f"no CPU kernel registered for {missing}"
        return torch.ops.mtbert_fast_C

    return require
