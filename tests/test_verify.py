"""verify: passes on a faithful artifact, fails (exit 1) and names the stage on a broken one."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
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
    twice = verify([broken, broken], masked / "masked", None, masked / "glue", Tolerance())
    assert [r["stage"] for r in twice["stages"]] == [str(broken)] * 2  # a folder given twice is checked twice
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


def test_agreement_and_metric_drop_bounds_decide_and_are_printed(masked, stripped, tmp_path):
    """A lower-precision stand-in (weights perturbed) passes only on stated bounds."""
    import dataclasses

    from deploy.verify import summary_lines
    from pipeline.batching import collate, encode
    from pipeline.models import load_tokenizer
    from pipeline.tasks import get_task, load_split

    variant = tmp_path / "variant"
    optimize(stripped / "onnx", variant)
    encoded = encode(
        load_tokenizer(str(masked / "masked")), load_split(get_task("sst2"), "dev", masked / "glue"), 128
    )
    session = ort.InferenceSession(str(variant / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = collate(encoded, np.arange(len(encoded)))
    logits = session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]
    model = ir.load(variant / "model.onnx")
    classifier = next(n for n in model.graph if n.outputs[0].name == "logits")
    bias = classifier.inputs[-1]  # Gemm(x, W, b)
    shifted = bias.const_value.numpy().copy()
    shifted[1] += float(np.median(logits[:, 0] - logits[:, 1]))  # about half the predictions flip
    replace_tensor(bias, shifted)
    ir.save(model, variant / "model.onnx")
    loose = Tolerance(atol=1e3, rtol=1e3)  # element-wise: anything; the dev-set checks decide
    report = verify([variant], masked / "masked", None, masked / "glue", loose)
    metric = report["metric"]
    assert 0 < metric["agreement"] < 1 and metric["failed_checks"] == ["agreement"] and not report["passed"]
    assert metric["metric_drop"] == pytest.approx(metric["pytorch"]["accuracy"] - metric["onnx"]["accuracy"])
    flipped = metric["examples"] - metric["identical_predictions"]
    line = summary_lines(report)[-1]
    assert line.startswith("FAIL") and "(needs >= 100.0%)" in line and "(failed: agreement)" in line
    assert f"agreement {metric['examples'] - flipped}/{metric['examples']}" in line

    stated = dataclasses.replace(loose, min_agreement=metric["agreement"], max_metric_drop=1.0)
    report = verify([variant], masked / "masked", None, masked / "glue", stated)
    assert report["passed"] and report["metric"]["failed_checks"] == []
    strict_drop = dataclasses.replace(stated, max_metric_drop=max(0.0, metric["metric_drop"]) / 2)
    if metric["metric_drop"] > 0:
        report = verify([variant], masked / "masked", None, masked / "glue", strict_drop)
        assert report["metric"]["failed_checks"] == ["metric_drop"]
    with pytest.raises(ValueError, match="min_agreement must be in"):
        Tolerance(min_agreement=1.5)
