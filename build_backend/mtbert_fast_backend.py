"""PEP 517 build backend: setuptools.build_meta, with torch added to the build requirements at the version of the
torch that will import the extension.

The compiled extension links against libtorch's C++ ABI, which changes between torch releases, so it has to be
compiled against exactly the torch it runs with. An isolated build environment would otherwise get the newest torch
from the index. The torch wanted is, in order:
  $MTBERT_FAST_BUILD_TORCH   a version ("2.13.0") or a requirement ("torch==2.13.0+cpu")
  the torch installed in the environment being installed into: pip runs this backend with that environment's
                             interpreter, inside the build environment only through PYTHONPATH, so the same
                             interpreter started without it sees the target's site-packages
  any torch                  when neither gives one (a front end such as `python -m build` that runs the backend in
                             a venv of its own; set $MTBERT_FAST_BUILD_TORCH there)
Building without isolation (pip --no-build-isolation) skips these requirements and compiles against the torch
already installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook this module does not override)

TORCH_ENV = "MTBERT_FAST_BUILD_TORCH"


def _installed_torch_version() -> str | None:
    """torch's version in the environment of this backend's interpreter, outside any build isolation (-E drops the
    PYTHONPATH and PYTHONNOUSERSITE that isolate it)."""
    code = "import importlib.metadata as m\ntry:\n print(m.version('torch'))\nexcept m.PackageNotFoundError:\n pass"
    try:
        out = subprocess.run([sys.executable, "-E", "-c", code], capture_output=True, text=True, timeout=60,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def torch_requirement() -> str:
    """The torch requirement of the build (see the module docstring)."""
    wanted = os.environ.get(TORCH_ENV, "").strip() or _installed_torch_version()
    if not wanted:
        return "torch"
    if wanted[0].isdigit():
        return f"torch=={wanted}"
    return wanted


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + [torch_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + [torch_requirement()]
