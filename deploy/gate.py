"""Regression gate: a run's summary against a committed baseline, as a list of named checks.

A check fails when, for a variant the baseline lists,

- the task metric (the ONNX dev metric when verify ran, else PyTorch's) is below
  ``baseline - metric_drop`` (absolute, in the metric's own units: 0.01 is one accuracy point);
- parity fails (any stage beyond tolerance, or predictions that differ from PyTorch), or the
  baseline had a verify report and the run has none; a parity failure of a variant the baseline
  does not list fails too;
- the speedup vs dense at a batch x sequence point is below ``baseline * (1 - speedup_drop)``
  (relative). Speedups are medians of interleaved per-round ratios, so they hold on a shared
  machine where absolute milliseconds drift; absolute times are never compared;
- the variant, or one of its metric or speedup points, is missing from the run, or the run is
  of another task.

Baseline file (``format`` 1), written by :func:`make_baseline` from a run that passes parity::

    {"format": 1, "kind": "mlpruning-baseline", "task": "sst2", "metric_name": "accuracy",
     "tolerance": {"metric_drop": 0.01, "speedup_drop": 0.15},
     "source_run": "quick", "tool_version": "0.1.0", "environment": {"cpu": ..., "threads": 1},
     "variants": {"dense": {"metric": 0.89, "parity": true, "speedups": {}},
                  "step1": {"metric": 0.88, "parity": true, "speedups": {"1x128": 1.7}}}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.summary import is_baseline
from mlpruning import __version__
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json

FORMAT = 1
KIND = "mlpruning-baseline"


@dataclass(frozen=True)
class GateTolerance:
    metric_drop: float = 0.01
    speedup_drop: float = 0.15

    def __post_init__(self) -> None:
        if not 0 <= self.metric_drop <= 1:
            raise ValueError(f"metric_drop must be in [0, 1], got {self.metric_drop}")
        if not 0 <= self.speedup_drop < 1:
            raise ValueError(f"speedup_drop must be in [0, 1), got {self.speedup_drop}")


@dataclass(frozen=True)
class Check:
    variant: str
    name: str
    value: str
    limit: str
    passed: bool
    reason: str = ""


@dataclass(frozen=True)
class GateResult:
    checks: list[Check] = field(default_factory=list)
    tolerance: GateTolerance = field(default_factory=GateTolerance)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [f"{c.variant}: {c.reason}" for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerance": asdict(self.tolerance),
            "reasons": self.reasons,
            "checks": [asdict(c) for c in self.checks],
        }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _parity_failure(parity: dict[str, Any]) -> str:
    """What failed, e.g. ``optimize max_abs 3.1e-02`` or ``860/872 identical predictions``."""
    stages = [s for s in parity["stages"] if s.get("gating", True) and not s.get("passed")]
    parts = [f"{s['stage']} max_abs {s['max_abs']:.1e}" for s in stages]
    if parity.get("metric_passed") is False:
        parts.append(f"{parity.get('identical_predictions')}/{parity.get('examples')} identical predictions")
    return ", ".join(parts) or "verify report says FAILED"


def _parity_check(variant: str, parity: dict[str, Any] | None) -> Check:
    if parity is None:
        return Check(variant, "parity", "-", "passed", False, "no verify report (parity unknown)")
    if parity["passed"]:
        gating = [s for s in parity["stages"] if s.get("gating", True)]
        worst = max((s["max_abs"] or 0.0 for s in gating), default=0.0)
        return Check(variant, "parity", f"max_abs {worst:.1e}", "passed", True)
    failure = _parity_failure(parity)
    return Check(variant, "parity", "FAILED", "passed", False, f"parity failed: {failure}")


def _metric_check(variant: str, base: float, entry: dict[str, Any], tol: GateTolerance) -> Check:
    metric = entry["metric"]
    name, value = f"metric {metric.get('name') or ''}".strip(), metric.get("value")
    floor = base - tol.metric_drop
    limit = f">= {floor:.4f} ({base:.4f} - {tol.metric_drop:g})"
    if value is None:
        return Check(variant, name, "-", limit, False, f"{name} missing (no eval.json or verify report)")
    ok = value >= floor
    reason = "" if ok else f"{name} {value:.4f} dropped below {floor:.4f} (baseline {base:.4f})"
    return Check(variant, name, _fmt(value), limit, ok, reason)


def _speedup_checks(
    variant: str, base: dict[str, float], entry: dict[str, Any], tol: GateTolerance
) -> list[Check]:
    points = {p["key"]: p.get("speedup") for p in (entry.get("latency") or {}).get("points", [])}
    checks = []
    for key, want in base.items():
        floor = want * (1 - tol.speedup_drop)
        limit = f">= {floor:.2f}x ({want:.2f}x - {tol.speedup_drop:.0%})"
        got = points.get(key)
        if got is None:
            checks.append(Check(variant, f"speedup {key}", "-", limit, False, f"no speedup at {key} (bench)"))
            continue
        ok = got >= floor
        reason = "" if ok else f"speedup at {key} {got:.2f}x fell below {floor:.2f}x (baseline {want:.2f}x)"
        checks.append(Check(variant, f"speedup {key}", f"{got:.2f}x", limit, ok, reason))
    return checks


def _variant_checks(
    variant: str, base: dict[str, Any], entry: dict[str, Any] | None, tol: GateTolerance
) -> list[Check]:
    if entry is None:
        return [Check(variant, "present", "absent", "present", False, "variant missing from the run")]
    checks = []
    if base.get("metric") is not None:
        checks.append(_metric_check(variant, float(base["metric"]), entry, tol))
    if base.get("parity"):
        checks.append(_parity_check(variant, entry.get("parity")))
    checks += _speedup_checks(variant, base.get("speedups") or {}, entry, tol)
    return checks


def compare(
    summary: dict[str, Any], baseline: dict[str, Any], tolerance: GateTolerance | None = None
) -> GateResult:
    """Check a run summary against a baseline; ``tolerance`` overrides the baseline's."""
    tol = tolerance or GateTolerance(**(baseline.get("tolerance") or {}))
    checks = []
    if baseline.get("task") and summary.get("task") != baseline["task"]:
        reason = f"run is {summary.get('task')}, baseline is {baseline['task']}"
        checks.append(Check("run", "task", str(summary.get("task")), baseline["task"], False, reason))
    variants = summary["variants"]
    for variant, base in baseline["variants"].items():
        checks += _variant_checks(variant, base, variants.get(variant), tol)
    for variant, entry in variants.items():
        parity = entry.get("parity")
        if variant not in baseline["variants"] and parity is not None and not parity["passed"]:
            checks.append(_parity_check(variant, parity))
    return GateResult(checks, tol)


def make_baseline(summary: dict[str, Any], tolerance: GateTolerance | None = None) -> dict[str, Any]:
    """A baseline from a run that passes parity: its metrics and speedups, with tolerances."""
    failing = [v for v, e in summary["variants"].items() if e.get("parity") and not e["parity"]["passed"]]
    if failing:
        raise UserError(
            f"run {summary.get('run')} fails parity ({', '.join(failing)}): "
            "fix it before using it as a baseline"
        )
    variants = {}
    for name, entry in summary["variants"].items():
        points = (entry.get("latency") or {}).get("points", [])
        variants[name] = {
            "metric": entry["metric"].get("value"),
            "parity": entry.get("parity") is not None,
            # the baseline is the reference of every ratio (1.0 by definition): nothing to gate
            "speedups": {}
            if is_baseline(summary, name)
            else {p["key"]: p["speedup"] for p in points if p.get("speedup")},
        }
    env = summary.get("environment") or {}
    return {
        "format": FORMAT,
        "kind": KIND,
        "task": summary.get("task"),
        "metric_name": summary.get("metric_name"),
        "tolerance": asdict(tolerance or GateTolerance()),
        "source_run": summary.get("run"),
        "tool_version": __version__,
        "environment": {k: env.get(k) for k in ("cpu", "cpu_count", "threads", "provider")},
        "variants": variants,
    }


def load_baseline(path: Path) -> dict[str, Any]:
    data = read_json(path, "write it again with `mlpruning compare RUN --write-baseline`")
    if data is None:
        raise UserError(
            f"baseline {path} does not exist: write one with `mlpruning compare RUN --write-baseline`"
        )
    if data.get("kind") != KIND or data.get("format") != FORMAT or not isinstance(data.get("variants"), dict):
        raise UserError(
            f"{path} is not a gate baseline (kind {KIND}, format {FORMAT}): write one with --write-baseline"
        )
    try:
        GateTolerance(**(data.get("tolerance") or {}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: bad tolerance ({exc})") from None
    return data


def format_table(result: GateResult) -> str:
    rows = [("variant", "check", "value", "limit", "result")]
    rows += [(c.variant, c.name, c.value, c.limit, "ok" if c.passed else "FAIL") for c in result.checks]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"FAIL {r}" for r in result.reasons]
    return "\n".join(lines)
