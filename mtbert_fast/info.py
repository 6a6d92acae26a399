"""What this install of mtbert_fast can run, and why: `python -m mtbert_fast.info`.

Prints the versions, whether the compiled extension loaded, and for every op, device and representative
dtype which backend the automatic choice takes and why each other backend cannot run it.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

import mtbert_fast
from mtbert_fast import _ext
from mtbert_fast.ops import dispatch, registry

DTYPES = (torch.float32, torch.bfloat16)
ENV_VARS = (dispatch.ENV_VAR, _ext.ISA_ENV, "TRITON_INTERPRET", "MTBERT_FAST_DEBUG_CHECKS")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _triton_version() -> str:
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # not installed, or an install that fails to import
        return f"not importable ({type(exc).__name__}: {exc})"
    return getattr(triton, "__version__", "unknown version")


def _optional_version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"


def devices() -> list[torch.device]:
    """The devices the backend table covers: the CPU, and the first GPU where CUDA is available."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def backend_rows(footnotes: dict[str, int]) -> list[list[str]]:
    """One row per (op, device, dtype): the automatic choice, then each backend as "yes" or a footnote [n]."""
    rows = []
    for op in registry.OPS:
        for device in devices():
            for dtype in DTYPES:
                reasons = {b: dispatch.reason(b, op, device, dtype) for b in dispatch.BACKENDS}
                auto = next((b for b in dispatch.BACKENDS if reasons[b] is None), "none")
                cells = []
                for b in dispatch.BACKENDS:
                    why = reasons[b]
                    cells.append("yes" if why is None else f"[{footnotes.setdefault(why, len(footnotes) + 1)}]")
                rows.append([op, device.type, _dtype_name(dtype), auto] + cells)
    return rows


def op_rows() -> list[list[str]]:
    """One row per declared op: its backends with kernels, how its gradient is computed, its schema."""
    rows = []
    for name, op in registry.OPS.items():
        if op.backward_schema is not None:
            backward = f"{name}_backward op"
        elif op.backward is not None:
            backward = "formula"
        else:
            backward = "none"
        rows.append([name, ", ".join(op.backends), backward, op.schema])
    return rows


def report() -> str:
    """The whole report as text."""
    out: list[str] = []
    out.append(f"mtbert_fast   {mtbert_fast.__version__}  ({os.path.dirname(mtbert_fast.__file__)})")
    out.append(f"python        {sys.version.split()[0]}")
    out.append(f"torch         {torch.__version__}")
    if torch.version.cuda is None:
        out.append("  CUDA        torch built without CUDA")
    else:
        out.append(f"  CUDA        {torch.version.cuda}, available: {torch.cuda.is_available()}")
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            out.append(f"  cuda:{i}      {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    out.append(f"triton        {_triton_version()}")
    out.append(f"transformers  {_optional_version('transformers')}")
    if _ext.loaded():
        out.append(f"extension     mtbert_fast._C loaded; CUDA kernels built: {'yes' if _ext.built_with_cuda() else 'no'}")
        if _ext.built_with_cuda():
            sass, ptx = _ext.cuda_archs()
            out.append(f"  CUDA code   machine code for {', '.join(sass) or 'none'}; PTX for {', '.join(ptx) or 'none'}")
    else:
        out.append(f"extension     not loaded: {_ext.load_error}")
    if _ext.build_info:
        built = _ext.build_info
        out.append(f"  built for   torch {built['torch']} (CUDA {built['torch_cuda'] or 'none'}); CPU kernels for "
                   f"{', '.join(_ext.built_isas())}, loaded: {_ext.cpu_isa() or 'none'}")
        out.append(f"  CUDA archs  {', '.join(built['cuda_archs']) or 'none'}"
                   + (f" ({built['cuda_not_built']})" if built.get("cuda_not_built") else ""))
    out.append(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}")
    for var in ENV_VARS:
        out.append(f"${var} = {os.environ.get(var, '(unset)')}")

    out.append("")
    out.append("Ops (each declared once under mtbert_fast/ops/; kernels per backend besides the reference):")
    out.extend("  " + line for line in _table(["op", "kernels", "backward", "schema"], op_rows()))

    out.append("")
    order = " -> ".join(dispatch.BACKENDS)
    out.append(f"Backends per op (automatic choice takes the first usable of {order}):")
    footnotes: dict[str, int] = {}
    rows = backend_rows(footnotes)
    out.extend("  " + line for line in _table(["op", "device", "dtype", "auto"] + list(dispatch.BACKENDS), rows))
    if footnotes:
        out.append("")
        out.append("Why a backend cannot run:")
        out.extend(f"  [{n}] {why}" for why, n in footnotes.items())
    out.append("")
    out.append("Input limits (an input outside them goes to the next backend; forcing that backend raises):")
    limit_rows = [[op, b, "; ".join(dispatch.limits_of(op, b))] for op in registry.OPS for b in dispatch.BACKENDS
                  if dispatch.limits_of(op, b)]
    out.extend("  " + line for line in _table(["op", "backend", "limits"], limit_rows))
    out.append("  cuda, every op: a GPU the build holds code for (above); attention_varlen also the shared memory its "
               "head_dim needs")
    try:
        forced = dispatch.requested_backend()
    except ValueError as exc:
        out.append(f"\n{exc}")
    else:
        if forced != "auto":
            out.append(f"\n${dispatch.ENV_VAR}={forced} forces that backend for every op; a row where it is not"
                       " 'yes' raises BackendUnavailable")

    out.append("")
    choices = dispatch.last_choices()
    if not choices:
        out.append("Automatic choices made in this process: none yet (they are recorded as ops run)")
    else:
        out.append("Automatic choices made in this process:")
        rows = []
        for (op, device, dtype), (backend, passed_over) in sorted(choices.items(), key=lambda kv: str(kv[0])):
            skipped = "; ".join(f"{b}: {why}" for b, why in passed_over.items()) or "-"
            rows.append([op, device, _dtype_name(dtype), backend, skipped])
        out.extend("  " + line for line in _table(["op", "device", "dtype", "backend", "passed over"], rows))
    return "\n".join(out)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
