"""Run-folder subcommands: report and compare (the regression gate), on the shared app."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlpruning.cli.common import app
from mlpruning.core.errors import UserError

if TYPE_CHECKING:
    from deploy.gate import GateTolerance


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run folder written by `mlpruning run`.")],
) -> None:
    """Write summary.json, report.md and a self-contained report.html (plots embedded) for a run."""
    from deploy.report import write_report

    for kind, path in write_report(run).items():
        typer.echo(f"{kind:>8}: {path}")


@app.command()
def compare(
    run: Annotated[Path, typer.Argument(help="Run folder (or its summary.json) to check.")],
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="Baseline JSON to check against (exit 1 on regression).")
    ] = None,
    write_baseline: Annotated[
        Path | None, typer.Option("--write-baseline", help="Write a baseline from this run here.")
    ] = None,
    metric_tol: Annotated[
        float | None,
        typer.Option("--metric-tol", help="Allowed absolute metric drop [the baseline's, else 0.01]."),
    ] = None,
    speedup_tol: Annotated[
        float | None,
        typer.Option("--speedup-tol", help="Allowed relative speedup drop [the baseline's, else 0.15]."),
    ] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON result here.")] = None,
) -> None:
    """Regression gate: metric, parity and speedup vs dense of a run against a baseline."""
    from deploy.gate import compare as run_gate
    from deploy.gate import format_table, load_baseline, make_baseline
    from deploy.summary import load_summary
    from mlpruning.core.atomic import write_json

    start = time.perf_counter()
    if baseline is None and write_baseline is None:
        raise UserError("compare needs --baseline B.json (check) or --write-baseline OUT.json (record)")
    summary = load_summary(run)
    base = load_baseline(baseline) if baseline else None
    tolerance = _tolerance(base, metric_tol, speedup_tol)
    if write_baseline:
        write_json(write_baseline, make_baseline(summary, tolerance))
        typer.echo(f"baseline written: {write_baseline}")
    if base is None:
        return
    result = run_gate(summary, base, tolerance)
    if report:
        write_json(report, {"run": str(run), "baseline": str(baseline), **result.to_json()})
    typer.echo(format_table(result))
    state = "PASSED" if result.passed else "FAILED"
    typer.echo(f"{state} ({len(result.checks)} checks, {time.perf_counter() - start:.1f} s)")
    if not result.passed:
        raise typer.Exit(1)


def _tolerance(base: dict | None, metric_tol: float | None, speedup_tol: float | None) -> GateTolerance:
    """The baseline's tolerances (defaults without one), each overridden by its flag when given."""
    from deploy.gate import GateTolerance

    values = dict((base or {}).get("tolerance") or {})
    if metric_tol is not None:
        values["metric_drop"] = metric_tol
    if speedup_tol is not None:
        values["speedup_drop"] = speedup_tol
    try:
        return GateTolerance(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"tolerance: {exc}") from None
