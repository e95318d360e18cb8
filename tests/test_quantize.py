"""INT8: quantize's choice by measurement, verify's INT8 bounds, serving, and the bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from deploy.cpu_features import cpu_features
from deploy.quantize import quantize
from deploy.quantize_parts import QuantizeOptions
from deploy.verify import Tolerance, summary_lines, verify
from mlpruning.cli import app
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def int8(stripped, masked, tmp_path_factory) -> dict[str, Path]:
    """The tiny optimized model quantized each way (dev and calibration data: the tiny GLUE)."""
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for mode in ("dynamic", "static"):
        opts = QuantizeOptions(mode=mode, calibration_examples=16, max_metric_drop=1.0, min_agreement=0.0)
        quantize(stripped / "opt", root / mode, opts, masked / "glue")
        out[mode] = root / mode
    return out


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_each_mode_is_measured_recorded_and_passes_verify(int8, stripped, masked, mode):
    report = json.loads((int8[mode] / "quantize.json").read_text())
    assert report["chosen"]["mode"] == mode and report["candidates"]
    for c in report["candidates"]:
        assert 0 <= c["agreement"] <= 1 and c["speedup"] > 0 and isinstance(c["metric"], float)
    ops = {n.op_type for n in onnx.load(int8[mode] / "model.onnx").graph.node}
    assert ("MatMulInteger" in ops) if mode == "dynamic" else ("QuantizeLinear" in ops)
    assert report["cpu"]["flags"] is not None and "vnni" in report["cpu"]
    assert report["size_bytes"]["int8"] < report["size_bytes"]["fp32"]

    checked = verify([stripped / "onnx", int8[mode]], masked / "masked", None, masked / "glue", Tolerance())
    assert checked["int8"] and checked["tolerance"]["min_agreement"] == 0.99
    assert checked["tolerance"]["max_metric_drop"] == 0.01
    export, quantized = checked["stages"]
    assert export["gating"] and not quantized["gating"]  # INT8 logits: reported, not gated
    assert checked["passed"], summary_lines(checked)
    line = summary_lines(checked)[-1]
    assert f"agreement {checked['metric']['identical_predictions']}/32" in line and "(needs >= 99.0%)" in line


def _flip_classifier(folder: Path) -> None:
    """Push every prediction to class 1 (the tiny reference says 0) through the classifier's
    bias, an fp32 Add after the int8 MatMul."""
    model = onnx.load(folder / "model.onnx")
    add = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    init = {i.name: i for i in model.graph.initializer}
    bias = next(init[name] for name in add.input if name in init)
    bias.CopyFrom(onnx.numpy_helper.from_array(np.array([-50.0, 50.0], np.float32), bias.name))
    onnx.save(model, folder / "model.onnx")


def test_an_int8_variant_below_the_agreement_bound_fails_verify_with_exit_1(int8, masked, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(int8["dynamic"], broken)
    _flip_classifier(broken)
    args = ["verify", str(broken), "--reference", str(masked / "masked"), "--data-dir", str(masked / "glue")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "(failed: agreement" in result.output and "FAILED" in result.output


def test_cpu_features_are_read_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Test CPU\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    found = cpu_features(info)
    assert found["cpu"] == "Test CPU" and found["machine"] == "x86_64" and found["vnni"] is True
    assert found["flags"] == ["avx2", "avx512f", "avx512_vnni"]
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu sse avx2\n")
    assert cpu_features(info)["vnni"] is False
    assert cpu_features(tmp_path / "absent")["vnni"] is None


def test_an_int8_folder_is_served_with_the_answers_of_a_direct_run(int8):
    pytest.importorskip("fastapi")
    from deploy.serve import BackgroundServer, ServeConfig, create_app
    from tests.test_serve import LIMITS, TEXTS, assert_matches, call, direct_scores

    folder = int8["static"]
    with BackgroundServer(create_app(ServeConfig(folder, threads=1, **LIMITS))) as server:
        for text in TEXTS[:3]:  # one request at a time: each runs alone, as the direct run does
            status, body = call(server, "POST", "/predict", {"texts": [text]})
            assert status == 200, body
            assert_matches(body["predictions"], direct_scores(folder, [text]))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("quantized", "is already quantized: pass the fp32 folder"),
        ("unoptimized", "run mlpruning optimize on it"),
        ("mode", "--mode must be one of auto, dynamic, static"),
        ("task", "was trained for sst2, not stsb"),
        ("empty", "has no examples"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(case, message, int8, stripped, masked, tmp_path):
    out = tmp_path / "out"
    src, extra = stripped / "opt", []
    if case == "quantized":
        src = int8["dynamic"]
    elif case == "unoptimized":
        src = stripped / "onnx"
    elif case == "mode":
        extra = ["--mode", "fast"]
    elif case == "task":
        extra = ["--task", "stsb"]
    glue = masked / "glue"
    if case == "empty":
        glue = tmp_path / "glue"
        shutil.copytree(masked / "glue", glue)
        header = (glue / "SST-2" / "train.tsv").read_text().splitlines()[0]
        (glue / "SST-2" / "train.tsv").write_text(header + "\n")
    proc = run_cli("quantize", str(src), "--out", str(out), "--data-dir", str(glue), *extra)
    assert_one_line_error(proc, message)
    assert not out.exists()
