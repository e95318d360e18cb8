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
    inits = onnx.load(int8[mode] / "model.onnx").graph.initializer  # the table, not its scale
    word = [i.data_type for i in inits if "word_embeddings" in i.name and len(i.dims) == 2]
    if mode == "dynamic":  # measured last, with the chosen settings, and kept (bounds are loose here)
        assert report["chosen"]["int8_embeddings"] and report["candidates"][-1]["int8_embeddings"]
        assert onnx.TensorProto.FLOAT not in word and word  # the table is stored in 8 bits
    else:  # a QDQ Gather would quantize the embedding output too: static leaves the tables fp32
        assert not any(c["int8_embeddings"] for c in report["candidates"])
        assert word == [onnx.TensorProto.FLOAT]

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


class FakeScorer:
    """choose()'s view of a scorer, with outcomes fixed per candidate (no model runs)."""

    def __init__(self, outcome, opts: QuantizeOptions | None = None) -> None:
        from deploy.quantize_parts import QuantizeOptions as Options

        self.opts = opts or Options(mode="dynamic")
        self.groups = {"head": ["cls"], "layer.0": ["a"], "layer.1": ["b"], "layer.2": ["c"], "other": []}
        self.outcome, self.tried = outcome, []
        self.src, self.task, self.fp32_metric = Path("src"), type("T", (), {"main_metric": "accuracy"}), 0.9

    def score(self, candidate):
        from deploy.quantize import Scored

        metric, agreement, speedup = self.outcome(candidate)
        ok = self.fp32_metric - metric <= self.opts.max_metric_drop and agreement >= self.opts.min_agreement
        self.tried.append(Scored(candidate, metric, agreement, speedup, ok))
        return self.tried[-1]


def test_choose_takes_the_fastest_passing_candidate():
    from deploy.quantize import choose

    chosen = choose(FakeScorer(lambda c: (0.9, 1.0, 2.0 if c.per_channel else 1.5)))
    assert chosen.candidate.per_channel and chosen.speedup == 2.0


def test_accuracy_control_keeps_the_head_then_the_most_sensitive_layers_fp32():
    from deploy.quantize import choose

    # each fp32 layer restores agreement: layer.1 most, then layer.2; both are needed
    gain = {"head": 0.001, "layer.0": 0.0, "layer.1": 0.004, "layer.2": 0.003}
    scorer = FakeScorer(lambda c: (0.9, 0.984 + sum(gain[g] for g in c.keep_fp32), 3.0 - len(c.keep_fp32)))
    chosen = choose(scorer)
    assert chosen.candidate.keep_fp32 == ("head", "layer.1", "layer.2") and chosen.passed
    tried = [s.candidate for s in scorer.tried]
    assert len(tried) == len(set(tried))  # ("head", "layer.1") was measured alone: not again


def test_accuracy_control_stops_at_one_layer_when_one_suffices_and_fails_when_none_does():
    from deploy.quantize import choose
    from mlpruning.core.errors import CheckFailed

    scorer = FakeScorer(lambda c: (0.9, 0.995 if "layer.2" in c.keep_fp32 else 0.98, 2.0))
    assert choose(scorer).candidate.keep_fp32 == ("head", "layer.2")
    assert [s.candidate.keep_fp32 for s in scorer.tried][-4:] == [
        ("head",),
        ("head", "layer.0"),
        ("head", "layer.1"),
        ("head", "layer.2"),
    ]
    with pytest.raises(CheckFailed, match="even with every layer fp32"):
        choose(FakeScorer(lambda c: (0.5, 0.5, 2.0)))


def test_int8_embedding_tables_are_kept_only_when_the_bounds_still_hold():
    from deploy.quantize import choose

    def outcome(drop: float):
        return lambda c: (0.9, 0.995 - (drop if c.int8_embeddings else 0.0), 2.0 if c.per_channel else 1.5)

    for drop, kept in ((0.001, True), (0.01, False)):
        scorer = FakeScorer(outcome(drop))
        scorer.groups["embeddings"] = ["/embeddings/word_embeddings/Gather"]
        chosen = choose(scorer)
        assert chosen.candidate.per_channel and chosen.candidate.int8_embeddings is kept
        assert scorer.tried[-1].candidate.int8_embeddings  # measured once, on the chosen settings
        assert sum(s.candidate.int8_embeddings for s in scorer.tried) == 1
    static = FakeScorer(outcome(0.0), QuantizeOptions(mode="static"))
    static.groups["embeddings"] = ["/embeddings/word_embeddings/Gather"]
    assert not choose(static).candidate.int8_embeddings  # static keeps the tables fp32


def test_a_regression_int8_copy_agrees_within_a_share_of_the_score_range(tmp_path):
    """STS-B at INT8: a score agrees with fp32's within 2% of the labels' range, not within fp32's
    1e-4 (which no INT8 score meets); quantize and verify count it the same way."""
    from pipeline.config import FinetuneConfig
    from pipeline.export import export_onnx
    from pipeline.finetune import Finetuner
    from tests.conftest import make_glue_dir, save_tiny

    glue = make_glue_dir(tmp_path / "glue")
    base = save_tiny(tmp_path / "base", "bert", layers=1, heads=2, hidden=32, ffn=64)
    Finetuner(
        FinetuneConfig(task="stsb", model=str(base), epochs=1, batch_size=16, data_dir=str(glue)),
        tmp_path / "t",
    ).run()
    export_onnx(tmp_path / "t", tmp_path / "export")
    # a model trained on 64 pairs scores them at pearson ~0.07, noise any change moves: the
    # metric bound is off here, agreement is under test
    opts = QuantizeOptions(mode="dynamic", max_metric_drop=1.0)
    report = quantize(tmp_path / "export", tmp_path / "int8", opts, glue)
    assert report["chosen"]["keep_fp32"] == []
    tol = Tolerance(max_metric_drop=1.0)
    checked = verify([tmp_path / "export", tmp_path / "int8"], tmp_path / "t", None, glue, tol)
    metric = checked["metric"]
    span = float(
        np.ptp(
            [
                float(line.split("\t")[-1])
                for line in (glue / "STS-B" / "dev.tsv").read_text().splitlines()[1:]
            ]
        )
    )
    assert metric["agreement_tolerance"] == {"atol": pytest.approx(0.02 * span), "rtol": 0.0}
    assert metric["agreement"] == pytest.approx(report["chosen"]["agreement"], abs=1 / 32)
    assert checked["passed"], summary_lines(checked)
    assert "score within tolerance (atol" in summary_lines(checked)[-1]
    fp32 = verify([tmp_path / "export"], tmp_path / "t", None, glue, Tolerance())["metric"]
    assert fp32["agreement_tolerance"] == {"atol": 1e-4, "rtol": 1e-3}  # fp32 keeps verify's own


def test_tensorrt_target_is_symmetric_int8_qdq_and_build_takes_only_that(
    int8, stripped, masked, tmp_path, monkeypatch
):
    """TensorRT's explicit quantization: QDQ with int8 zero points 0. Dynamic INT8, uint8 QDQ and
    a QDQ model without --int8 are refused before tensorrt is imported (no GPU needed to say so)."""
    from deploy.trt_engine import BuildOptions, build_engine
    from tests.test_trt_engine import FakeTrt

    trt_dir = tmp_path / "trt"
    opts = QuantizeOptions(target="tensorrt", calibration_examples=16, max_metric_drop=1.0)
    report = quantize(stripped / "opt", trt_dir, opts, masked / "glue")
    assert (
        report["target"] == "tensorrt"
        and report["chosen"]["symmetric"]
        and report["chosen"]["mode"] == "static"
    )
    model = onnx.load(trt_dir / "model.onnx")
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    points = [init[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert points and all(z.dtype == np.int8 and not z.any() for z in points)
    checked = verify([stripped / "onnx", trt_dir], masked / "masked", None, masked / "glue", Tolerance())
    assert checked["passed"], summary_lines(checked)

    fake = FakeTrt()
    monkeypatch.setattr("deploy.trt_engine.import_tensorrt", lambda: fake)
    built = build_engine(trt_dir, tmp_path / "engine", BuildOptions(int8=True))
    assert "INT8" in fake.flags and built["int8"]
    refused = {
        (int8["dynamic"], "--int8"): "is dynamically quantized (DynamicQuantizeLinear, MatMulInteger)",
        (int8["static"], "--int8"): "uint8, int32 or non-zero zero points; TensorRT takes symmetric int8",
        (trt_dir, "--fp16"): "is INT8 (QuantizeLinear/DequantizeLinear): pass --int8",
        (stripped / "opt", "--int8"): "--int8 needs an explicitly quantized model (QDQ)",
    }
    for (folder, flag), message in refused.items():
        assert_one_line_error(run_cli("build", str(folder), "--out", str(tmp_path / "x"), flag), message)
    assert not (tmp_path / "x").exists()
    proc = run_cli(
        "quantize",
        str(stripped / "opt"),
        "--out",
        str(tmp_path / "y"),
        "--target",
        "tensorrt",
        "--mode",
        "dynamic",
    )
    assert_one_line_error(
        proc, "--target tensorrt takes static QDQ only (no dynamic ops): use --mode auto or static"
    )
