"""``engine.json``: what ``mlpruning build`` records beside a TensorRT ``model.plan``.

Three commands read it back: ``serve`` caps micro-batches and tokens to the engine's
optimization profile, ``export-triton`` bounds ``max_batch_size`` by it and finds the ONNX
model the plan was built from (``source``). The profile holds (min, opt, max) per axis::

    {"source": "...", "profile": {"batch": [1, 8, 32], "seq": [1, 128, 512]}, ...}

A corrupt file or a malformed profile is a one-line error asking for a rebuild, the same for all
three readers. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlpruning.core.contract import ENGINE_REPORT
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json

AXES = ("batch", "seq")
REBUILD = "rebuild the engine with mlpruning build"


def read_engine_report(folder: Path) -> dict[str, Any] | None:
    """The engine.json beside a model.plan in ``folder``; None when there is none."""
    return read_json(folder / ENGINE_REPORT, REBUILD)


def profile_ranges(folder: Path) -> dict[str, tuple[int, int, int]] | None:
    """(min, opt, max) of the profile's batch and seq axes; None without engine.json."""
    report = read_engine_report(folder)
    if report is None:
        return None
    profile = report.get("profile")
    ranges: dict[str, tuple[int, int, int]] = {}
    for axis in AXES:
        values = profile.get(axis) if isinstance(profile, dict) else None
        valid = isinstance(values, list) and len(values) == 3
        valid = valid and all(type(v) is int and v > 0 for v in values) and values == sorted(values)
        if not valid:
            raise UserError(
                f"{folder / ENGINE_REPORT} has no valid {axis} profile (min, opt, max): {REBUILD}"
            )
        ranges[axis] = (values[0], values[1], values[2])
    return ranges


def engine_source(folder: Path) -> Path:
    """The folder whose model.onnx the plan was built from (``folder`` when not recorded)."""
    source = (read_engine_report(folder) or {}).get("source")
    return Path(source) if isinstance(source, str) and source else folder
