"""The polynomials for the standard normal CDF Phi that the CPU kernels' erf GELU evaluates with AVX-512
(csrc/include/phi_polynomials.h, which this script writes).

    python tools/phi_polynomials.py > csrc/include/phi_polynomials.h

[-EDGE, EDGE] is cut into INTERVALS equal intervals; on interval i, Phi(-EDGE + (i + v) * width) for v in [0, 1] is
a polynomial of degree DEGREE in v, fitted to Phi in float64 by least squares on Chebyshev nodes with the weights
raised where the error peaks (a few rounds towards the minimax fit), then rounded to fp32. The header states the
table's largest errors, measured here as the kernels evaluate it (fp32 fused multiply-adds), against a float64 GELU
(x Phi(x), Phi from erfc) on [-EDGE, EDGE + 4].
"""

from __future__ import annotations

import math

import numpy as np

EDGE = 8.0
INTERVALS = 32
DEGREE = 6
NODES = 400
ROUNDS = 40


def phi(x: np.ndarray) -> np.ndarray:
    """Phi in float64, from erfc (no cancellation in the lower tail)."""
    return 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2.0))


def fit() -> np.ndarray:
    """[DEGREE + 1, INTERVALS] fp32: row d holds every interval's coefficient of v^d."""
    width = 2 * EDGE / INTERVALS
    v = 0.5 + 0.5 * np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES)
    table = np.empty((DEGREE + 1, INTERVALS))
    for i in range(INTERVALS):
        y = phi(-EDGE + (i + v) * width)
        weights = np.ones_like(v)
        for _ in range(ROUNDS):
            c = np.polynomial.polynomial.polyfit(v, y, DEGREE, w=weights)
            err = np.abs(np.polynomial.polynomial.polyval(v, c) - y)
            weights = 1 + 30 * err / err.max()
        table[:, i] = c
    return table.astype(np.float32)


def evaluate(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x Phi(x) for fp32 x >= -EDGE, step for step as the kernel computes it."""
    f = np.float32
    width = f(2 * EDGE / INTERVALS)
    # x past EDGE takes the last interval's end (Phi = 1 in fp32); the interval's index from one fused multiply-add,
    # v from another with the interval's start folded in exactly (width is a power of 2)
    t = np.minimum(x, f(EDGE - width * 2**-19))
    i = (t.astype(np.float64) / width + EDGE / width).astype(f).astype(np.int32)
    v = (t.astype(np.float64) / width + (f(EDGE / width) - i.astype(f))).astype(f)
    p = table[DEGREE][i]
    for d in range(DEGREE - 1, -1, -1):
        p = (p.astype(np.float64) * v + table[d][i]).astype(f)
    return x * p


def _literal(v: np.float32) -> str:
    """v as a C++ float literal that reads back as v (9 significant digits; a decimal point where %g leaves none)."""
    text = f"{v:.9g}"
    return text + (".f" if text.lstrip("-").isdigit() else "f")


HEADER = """\
// The standard normal CDF Phi as polynomials, for the erf GELU of the AVX-512 kernels (cpu_utils.h's gelu).
// [-kPhiEdge, kPhiEdge) is cut into {intervals} intervals of width {width:g}; on interval i,
//   Phi(-kPhiEdge + (i + v) * {width:g}) ~= sum_d kPhiPoly[d][i] v^d,  v in [0, 1).
// Written by tools/phi_polynomials.py (python tools/phi_polynomials.py > this file), which fits them and measures the
// table as the kernels evaluate it (fp32 fused multiply-adds) against a float64 GELU, x Phi(x), on [-{edge:g}, {top:g}]:
// |error| <= {err:.1e}; relative error <= {rel_big:.1e} where |GELU| > 1e-3, {rel_all:.1e} anywhere (the far lower
// tail).
#pragma once

namespace mtbert_fast::cpu {{

constexpr float kPhiEdge = {edge:g}.f;  // the intervals cover [-kPhiEdge, kPhiEdge)
constexpr int kPhiIntervals = {intervals};
constexpr int kPhiDegree = {degree};
alignas(64) constexpr float kPhiPoly[kPhiDegree + 1][kPhiIntervals] = {{
{table}
}};

}}  // namespace mtbert_fast::cpu
"""


def main() -> None:
    table = fit()
    top = EDGE + 4
    x = np.linspace(-EDGE, top, 2_000_001).astype(np.float32)
    exact = x.astype(np.float64) * phi(x.astype(np.float64))
    err = np.abs(evaluate(table, x).astype(np.float64) - exact)
    rel = err / np.maximum(np.abs(exact), 1e-300)
    rows = []
    for row in table:
        values = [_literal(v) for v in row]
        rows.append("    {" + ",\n     ".join(", ".join(values[j:j + 6]) for j in range(0, len(values), 6)) + "},")
    print(HEADER.format(edge=EDGE, intervals=INTERVALS, width=2 * EDGE / INTERVALS, top=top, err=err.max(),
                        rel_big=rel[np.abs(exact) > 1e-3].max(), rel_all=rel[exact != 0].max(), degree=DEGREE,
                        table="\n".join(rows)), end="")


if __name__ == "__main__":
    main()
