"""Regression gate: passes on the run its baseline came from, fails with the right reason on a
degraded one (metric drop, parity failure, slower, missing variant), exit codes 0 / 1 / 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mlpruning.cli.deploy_cmds  # noqa: F401  (registers report and compare on the app)
from deploy import run_layout as layout
from deploy.gate import GateTolerance, compare, load_baseline, make_baseline
from deploy.summary import build_summary
from mlpruning.cli.common import app
from mlpruning.core.errors import UserError
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_report import _bench, _verify, build_real_run, make_run


@pytest.fixture()
def run(tmp_path):
    return make_run(tmp_path / "run")


@pytest.fixture()
def baseline(run):
    return make_baseline(build_summary(run))


def _reasons(run, baseline, tolerance=None) -> list[str]:
    return compare(build_summary(run), baseline, tolerance).reasons


def test_baseline_schema_and_pass_on_its_own_run(run, baseline):
    assert set(baseline) == {
        "format",
        "kind",
        "task",
        "metric_name",
        "tolerance",
        "source_run",
        "tool_version",
        "environment",
        "variants",
    }
    assert baseline["tolerance"] == {"metric_drop": 0.01, "speedup_drop": 0.15}
    assert baseline["variants"]["step1"] == {
        "metric": 0.88,
        "parity": True,
        "speedups": {"1x128": 1.8, "8x128": 1.7},
    }
    assert baseline["variants"]["dense"]["speedups"] == {}  # dense is the reference: nothing to gate
    result = compare(build_summary(run), baseline)
    assert result.passed and result.reasons == []
    names = [(c.variant, c.name) for c in result.checks]
    assert ("step2", "speedup 8x128") in names and ("dense", "metric accuracy") in names


def _set_metric(run, variant: str, value: float) -> None:
    layout.verify_report(run, variant).write_text(json.dumps(_verify(run, variant, value)))


def test_metric_drop_beyond_tolerance_fails(run, baseline):
    _set_metric(run, "step1", 0.875)  # -0.005: within the 0.01 tolerance
    assert _reasons(run, baseline) == []
    _set_metric(run, "step1", 0.86)
    assert _reasons(run, baseline) == ["step1: metric accuracy 0.8600 dropped below 0.8700 (baseline 0.8800)"]
    assert _reasons(run, baseline, GateTolerance(metric_drop=0.05)) == []


def test_parity_failure_fails(run, baseline):
    layout.verify_report(run, "step2").write_text(json.dumps(_verify(run, "step2", 0.86, passed=False)))
    reasons = _reasons(run, baseline)
    assert "step2: parity failed: optimize max_abs 3.0e-02, 31/32 identical predictions" in reasons
    layout.verify_report(run, "step2").unlink()
    assert _reasons(run, baseline) == ["step2: no verify report (parity unknown)"]


def test_a_non_gating_stage_is_information(run, baseline):
    report = _verify(run, "step2", 0.88)
    report["stages"][-1].update(max_abs=0.2, failing_elements=40, passed=False, gating=False)  # INT8 logits
    layout.verify_report(run, "step2").write_text(json.dumps(report))
    assert _reasons(run, baseline) == []
    stages = build_summary(run)["variants"]["step2"]["parity"]["stages"]
    assert [s["gating"] for s in stages] == [True, False]  # reports without the key: gating
    report["passed"] = report["metric"]["passed"] = False
    report["metric"]["identical_predictions"] = 31
    layout.verify_report(run, "step2").write_text(json.dumps(report))
    assert _reasons(run, baseline) == ["step2: parity failed: 31/32 identical predictions"]


def test_parity_failure_of_a_variant_outside_the_baseline_fails(run, baseline):
    del baseline["variants"]["step2"]
    layout.verify_report(run, "step2").write_text(json.dumps(_verify(run, "step2", 0.86, passed=False)))
    assert [r.split(":")[0] for r in _reasons(run, baseline)] == ["step2"]


def _set_speedups(run, variant: str, speedups: dict[str, float]) -> None:
    layout.bench_report(run, variant).write_text(json.dumps(_bench(run, variant, speedups)))


def test_speedup_drop_is_relative(run, baseline):
    _set_speedups(run, "step2", {"1x128": 2.5 * 0.9, "8x128": 2.2})  # -10%: within 15%
    assert _reasons(run, baseline) == []
    _set_speedups(run, "step2", {"1x128": 2.5 * 0.8, "8x128": 2.2})
    assert _reasons(run, baseline) == ["step2: speedup at 1x128 2.00x fell below 2.12x (baseline 2.50x)"]
    baseline["variants"]["step2"]["speedups"]["1x384"] = 2.0
    assert "step2: no speedup at 1x384 (bench)" in _reasons(run, baseline, GateTolerance(speedup_drop=0.5))


def test_missing_variant_and_other_task_fail(tmp_path, baseline):
    short = make_run(tmp_path / "short", step2=False)
    assert _reasons(short, baseline) == ["step2: variant missing from the run"]
    baseline["task"] = "mrpc"
    assert "run: run is sst2, baseline is mrpc" in _reasons(short, baseline)


def test_no_baseline_from_a_failing_run(run):
    layout.verify_report(run, "step1").write_text(json.dumps(_verify(run, "step1", 0.88, passed=False)))
    with pytest.raises(UserError, match=r"fails parity \(step1\)"):
        make_baseline(build_summary(run))
    with pytest.raises(ValueError, match="speedup_drop must be in"):
        GateTolerance(speedup_drop=1.0)


def test_compare_command_exit_codes(run, tmp_path):
    runner = CliRunner()
    base = tmp_path / "baseline.json"
    result = runner.invoke(app, ["compare", str(run), "--write-baseline", str(base)])
    assert result.exit_code == 0, result.output
    assert load_baseline(base)["variants"]["step2"]["metric"] == 0.86
    result = runner.invoke(
        app, ["compare", str(run), "--baseline", str(base), "--report", str(tmp_path / "g.json")]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("PASSED")
    assert json.loads((tmp_path / "g.json").read_text())["passed"] is True
    _set_metric(run, "step2", 0.80)
    result = runner.invoke(app, ["compare", str(run), "--baseline", str(base)])
    assert result.exit_code == 1
    assert "FAIL step2: metric accuracy 0.8000 dropped below 0.8500" in result.output
    assert result.output.strip().splitlines()[-1].startswith("FAILED")
    loose = runner.invoke(app, ["compare", str(run), "--baseline", str(base), "--metric-tol", "0.1"])
    assert loose.exit_code == 0, loose.output
    # a summary.json is accepted in place of the run folder
    (run / "summary.json").write_text(json.dumps(build_summary(run)))
    assert runner.invoke(app, ["compare", str(run / "summary.json"), "--baseline", str(base)]).exit_code == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("compare", "{tmp}/missing", "--baseline", "{tmp}/b.json"), "does not exist"),
        (("compare", "{run}", "--baseline", "{tmp}/missing.json"), "baseline"),
        (("compare", "{run}", "--baseline", "{tmp}/corrupt.json"), "is not valid JSON"),
        (("compare", "{run}", "--baseline", "{tmp}/other.json"), "is not a gate baseline"),
        (("compare", "{run}"), "compare needs --baseline"),
        (("compare", "{run}", "--write-baseline", "{tmp}/b.json", "--speedup-tol", "2"), "speedup_drop"),
        (("report", "{tmp}/missing"), "does not exist"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(run, tmp_path, args, fragment):
    (tmp_path / "corrupt.json").write_text("{")
    (tmp_path / "other.json").write_text('{"format": 1}')
    proc = run_cli(*(a.format(tmp=tmp_path, run=run) for a in args))
    assert_one_line_error(proc, fragment)


def test_gate_on_real_runs_passes_on_its_baseline_and_fails_on_a_broken_pass(masked, stripped, tmp_path):
    good = build_real_run(masked, stripped, tmp_path / "good")
    baseline = make_baseline(build_summary(good))
    assert compare(build_summary(good), baseline).passed
    broken = build_real_run(masked, stripped, tmp_path / "broken", break_pass=True)
    # same latency numbers, so the parity failure is the only difference under test
    layout.bench_report(broken, "step1").write_bytes(layout.bench_report(good, "step1").read_bytes())
    result = compare(build_summary(broken), baseline)
    assert not result.passed
    assert any(r.startswith("step1: parity failed: optimize max_abs") for r in result.reasons), result.reasons
    assert all(c.passed for c in result.checks if c.name.startswith("speedup"))
    base_file = tmp_path / "baseline.json"
    base_file.write_text(json.dumps(baseline))
    assert CliRunner().invoke(app, ["compare", str(good), "--baseline", str(base_file)]).exit_code == 0
    assert CliRunner().invoke(app, ["compare", str(broken), "--baseline", str(base_file)]).exit_code == 1
