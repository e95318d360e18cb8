"""verify: passes on a faithful artifact, fails (exit 1) and names the stage on a broken one."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from deploy.verify import Tolerance, compare, verify
from graph_passes.linears import find_linears, replace_tensor
from graph_passes.optimize import optimize
from tests.test_cli import run_cli


def test_compare_follows_polygraphy_rule():
    want = np.array([1.0, 100.0, 0.0])
    got = np.array([1.00005, 100.05, 0.0])  # 2nd: abs 0.05 > atol but rel 5e-4 < rtol
    result = compare(got, want, Tolerance(atol=1e-4, rtol=1e-3))
    assert result["passed"] and result["failing_elements"] == 0
    assert result["max_abs"] == pytest.approx(0.05)
    bad = compare(np.array([1.01, 100.0, 0.0]), want, Tolerance(atol=1e-4, rtol=1e-3))
    assert not bad["passed"] and bad["failing_elements"] == 1
    assert bad["atol_that_passes"] == pytest.approx(0.01) and bad["rtol_that_passes"] == pytest.approx(0.01)


def test_non_finite_outputs_fail_and_non_finite_tolerances_are_refused():
    want = np.array([1.0, -2.0, 0.5])
    bad = compare(np.array([1.0, np.nan, np.inf]), want, Tolerance())
    assert not bad["passed"] and bad["failing_elements"] == 2
    for atol, rtol in ((float("nan"), 1e-3), (1e-4, float("inf")), (-1.0, 1e-3)):
        with pytest.raises(ValueError, match="finite and >= 0"):
            Tolerance(atol, rtol)


def test_faithful_artifacts_pass(masked, stripped, tmp_path):
    glue = masked / "glue"
    proc = run_cli(
        "verify",
        str(stripped / "opt"),
        "--reference",
        str(masked / "masked"),
        "--data-dir",
        str(glue),
        "--report",
        str(tmp_path / "v.json"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "PASSED"
    report = json.loads((tmp_path / "v.json").read_text())
    assert [r["stage"] for r in report["stages"]] == [str(stripped / "onnx"), str(stripped / "opt")]
    assert report["metric"]["identical_predictions"] == report["metric"]["examples"] == 32
    assert report["metric"]["pytorch"] == report["metric"]["onnx"]


def test_broken_pass_fails_and_points_at_its_stage(masked, stripped, tmp_path):
    broken = tmp_path / "broken"
    optimize(stripped / "onnx", broken)
    model = ir.load(broken / "model.onnx")
    manifest = json.loads((broken / "pruning.json").read_text())
    site = find_linears(model, manifest)[(1, "ffn_out")]
    replace_tensor(site.weight, site.weight.const_value.numpy() * 1.5)  # a pass that got a weight wrong
    ir.save(model, broken / "model.onnx")
    report = verify([stripped / "onnx", broken], masked / "masked", None, masked / "glue", Tolerance())
    assert not report["passed"]
    assert [r["passed"] for r in report["stages"]] == [True, False]
    proc = run_cli(
        "verify",
        str(broken),
        "--reference",
        str(masked / "masked"),
        "--data-dir",
        str(masked / "glue"),
        "--stage",
        str(stripped / "onnx"),
    )
    assert proc.returncode == 1 and proc.stdout.strip().splitlines()[-1] == "FAILED"
