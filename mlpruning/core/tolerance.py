"""The element-wise comparison rule every parity check uses (polygraphy's).

An element fails only where its absolute difference exceeds both ``atol`` and ``rtol`` times the
reference: |got - want| > atol and |got - want| > rtol * |want|. A NaN or inf difference always
fails (comparisons with NaN are False, so it would otherwise pass unnoticed).

INT8 outputs are not fp32 outputs, so an INT8 folder is held to its answers instead: at least
``INT8_MIN_AGREEMENT`` of the dev examples agree with fp32 (the task kind's rule; a score agrees
within ``INT8_SCORE_SHARE`` of the dev labels' range) and the main metric falls by at most
``INT8_MAX_METRIC_DROP``. Dev sets run ``EVAL_BATCH`` examples to a padded batch, in file order,
everywhere they are scored: with dynamic INT8 an example's output depends on its batch.
"""

from __future__ import annotations

import numpy as np

INT8_MIN_AGREEMENT = 0.99
INT8_MAX_METRIC_DROP = 0.01  # in the metric's units: one point of accuracy
INT8_SCORE_SHARE = 0.02  # STS-B (0-5): scores within 0.1
EVAL_BATCH = 64


def beyond_tolerance(
    got: np.ndarray, want: np.ndarray, atol: float, rtol: float
) -> tuple[np.ndarray, np.ndarray]:
    """(|got - want| in float64, the mask of elements that fail the rule)."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    failing = ((diff > atol) & (diff > rtol * np.abs(want))) | ~np.isfinite(diff)
    return diff, failing
