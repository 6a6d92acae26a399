"""Fixtures of the GPU tests."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def no_tf32():
    """fp32 products in full fp32 (no TF32) for the duration of a test, so that fp32 parity means 1e-4."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def pytest_runtest_logreport(report):
    """With $MTBERT_FAST_FAILURE_LOG set, each failure's report is appended to that file as it happens (on the
    controller, under pytest-xdist too), so a run stopped before its summary still tells what failed and how."""
    path = os.environ.get("MTBERT_FAST_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
