"""The element-wise comparison rule every parity check uses (polygraphy's).

An element fails only where its absolute difference exceeds both ``atol`` and ``rtol`` times the
reference: |got - want| > atol and |got - want| > rtol * |want|. A NaN or inf difference always
fails (comparisons with NaN are False, so it would otherwise pass unnoticed).
"""

from __future__ import annotations

import numpy as np


def beyond_tolerance(
    got: np.ndarray, want: np.ndarray, atol: float, rtol: float
) -> tuple[np.ndarray, np.ndarray]:
    """(|got - want| in float64, the mask of elements that fail the rule)."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    failing = ((diff > atol) & (diff > rtol * np.abs(want))) | ~np.isfinite(diff)
    return diff, failing
