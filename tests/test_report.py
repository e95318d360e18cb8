"""Run summary and report: synthetic run folders (every stage, missing stages, corrupt files) and
one run folder filled by the real producers (export, optimize, verify, bench) on a tiny model."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy import run_layout as layout
from deploy.report import build_blocks, reference_point, render_md, write_report
from deploy.report_plots import ParetoPoint, pareto_front
from deploy.summary import build_summary, load_summary
from mlpruning.core.errors import UserError

GEOMETRY = {"num_layers": 2, "num_heads": 4, "head_dim": 8, "hidden": 32, "intermediate": 64}
VERSIONS = {"mlpruning": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.23.0"}
BLOCK_NAMES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
DENSE_P50 = {(1, 128): 20.0, (8, 128): 150.0}
SPEEDUPS = {"step1": {"1x128": 1.8, "8x128": 1.7}, "step2": {"1x128": 2.5, "8x128": 2.2}}
METRICS = {"dense": 0.90, "step1": 0.88, "step2": 0.86}


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _manifest_layer(heads: list[int], ffn: int, blocks: bool) -> dict:
    layer = {
        "heads_kept": heads,
        "num_heads_kept": len(heads),
        "attn_out_rows_kept": 32,
        "ffn_rows_kept": ffn,
        "ffn_out_rows_kept": 30,
    }
    if blocks:  # kept of live blocks per matrix, 16x16 blocks
        layer["blocks"] = {
            m: {"kept": k, "live": 4} for m, k in zip(BLOCK_NAMES, (3, 4, 2, 1, 2, 4), strict=True)
        }
    return layer


def _manifest(step: str, ratio: float) -> dict:
    blocks = step == "block"
    return {
        "format_version": 2,
        "kind": "masked",
        "step": step,
        "task": "sst2",
        "target": 0.6 if blocks else 0.5,
        "target_of": "step1" if blocks else None,
        "remaining_ratio_of_step1": 0.6 if blocks else None,
        "block": [16, 16] if blocks else None,
        "geometry": GEOMETRY,
        "remaining_ratio": ratio,
        "layers": [_manifest_layer([0, 1, 3], 40, blocks), _manifest_layer([2], 24, blocks)],
        "versions": VERSIONS,
    }


def _verify(run: Path, variant: str, metric: float, passed: bool = True) -> dict:
    folders = [layout.onnx_dir(run, variant)] + ([] if variant == "dense" else [layout.opt_dir(run, variant)])
    stage = {"max_abs": 2e-6, "mean_abs": 5e-7, "p99_abs": 1.5e-6, "max_rel": 3e-6, "failing_elements": 0}
    stages = [
        {"stage": str(f), **stage, "elements": 64, "atol_that_passes": 0.0, "passed": True} for f in folders
    ]
    if not passed:  # the optimize stage broke
        stages[-1].update(max_abs=0.03, failing_elements=40, passed=False)
    return {
        "reference": "ckpt",
        "tolerance": {"atol": 1e-4, "rtol": 1e-3},
        "stages": stages,
        "metric": {
            "task": "sst2",
            "examples": 32,
            "pytorch": {"accuracy": metric},
            "onnx": {"accuracy": metric if passed else metric - 0.03},
            "identical_predictions": 32 if passed else 31,
            "passed": passed,
        },
        "passed": passed,
    }


def _stats(p50: float, batch: int) -> dict:
    return {
        "p50_ms": p50,
        "p90_ms": p50 * 1.05,
        "p99_ms": p50 * 1.1,
        "throughput_seq_per_s": batch * 1e3 / p50,
    }


def _bench(run: Path, variant: str, speedups: dict[str, float]) -> dict:
    points = []
    for (batch, seq), dense in DENSE_P50.items():
        speed = speedups[f"{batch}x{seq}"]
        point = {"batch": batch, "seq": seq, "model": _stats(dense / speed, batch)}
        point.update(baseline=_stats(dense, batch), speedup_median=speed, speedup_rounds=[speed] * 3)
        points.append(point)
    return {
        "model": str(layout.model_dir(run, variant)),
        "baseline": str(layout.onnx_dir(run, "dense")),
        "config": {"batches": [1, 8], "seqs": [128], "threads": 1, "warmup": 5, "rounds": 3, "iters": 10},
        "points": points,
        "environment": {
            "onnxruntime": "1.31.1",
            "mlpruning": "0.1.0",
            "python": "3.11.7",
            "cpu": "Test CPU",
            "cpu_count": 2,
            "provider": "CPUExecutionProvider",
        },
    }


def make_run(root: Path, step2: bool = True) -> Path:
    """A complete synthetic run folder (dense, step1 and optionally step2), stage by stage."""
    variants = ["dense", "step1"] + (["step2"] if step2 else [])
    for variant in variants:
        ckpt = layout.checkpoint_dir(root, variant)
        ratio = {"dense": 1.0, "step1": 0.5, "step2": 0.3}[variant]
        metrics = {"accuracy": METRICS[variant]} | ({} if variant == "dense" else {"remaining_ratio": ratio})
        _write(
            ckpt / "eval.json", {"task": "sst2", "split": "dev", "metrics": metrics, "remaining_ratio": ratio}
        )
        _write(ckpt / "mlpruning.json", {"task": "sst2", "versions": VERSIONS})
        onnx = layout.onnx_dir(root, variant)
        _write(onnx / "export.json", {"task": "sst2", "torch": "2.13.0+cpu", "onnxruntime": "1.31.1"})
        (onnx / "model.onnx").write_bytes(b"")
        _write(layout.verify_report(root, variant), _verify(root, variant, METRICS[variant]))
        if variant == "dense":
            continue
        # step1 ships its structure.json; step2's is derived from the manifest
        manifest = _manifest("head_row" if variant == "step1" else "block", ratio)
        _write(ckpt / "pruning.json", manifest)
        if variant == "step1":
            from pipeline.pruning.summary import structure

            _write(ckpt / "structure.json", structure(manifest))
        opt = layout.opt_dir(root, variant)
        passes = [{"name": "strip_heads", "params_before": 24576, "params_after": 20000}]
        passes.append({"name": "strip_rows", "params_before": 20000, "params_after": int(24576 * ratio)})
        _write(opt / "optimize.json", {"source": str(onnx), "passes": passes})
        (opt / "model.onnx").write_bytes(b"")
        _write(layout.bench_report(root, variant), _bench(root, variant, SPEEDUPS[variant]))
    return root


def test_summary_collects_every_stage(tmp_path):
    summary = build_summary(make_run(tmp_path / "run"))
    assert summary["task"] == "sst2" and summary["metric_name"] == "accuracy"
    assert list(summary["variants"]) == ["dense", "step1", "step2"] and summary["absent_variants"] == []
    step1, step2, dense = (summary["variants"][v] for v in ("step1", "step2", "dense"))
    assert step1["missing"] == [] and dense["missing"] == []
    assert step1["metric"] == {"name": "accuracy", "pytorch": 0.88, "onnx": 0.88, "value": 0.88}
    assert step1["remaining_ratio"] == 0.5 and dense["remaining_ratio"] == 1.0
    assert step1["params"] == {"before": 24576, "after": 12288}
    assert [s["stage"] for s in step1["parity"]["stages"]] == ["export", "optimize"]
    assert step1["parity"]["passed"] and step1["parity"]["stages"][1]["max_abs"] == 2e-6
    points = {p["key"]: p for p in step2["latency"]["points"]}
    assert points["1x128"]["speedup"] == 2.5 and points["1x128"]["p50_ms"] == pytest.approx(8.0)
    assert points["8x128"]["dense_p50_ms"] == 150.0 and points["8x128"]["p99_ms"] > points["8x128"]["p50_ms"]
    # no bench/dense.json: dense latency is the baseline side of step1's report, 1.0x by definition
    assert dense["latency"]["source"].startswith("bench/step1.json")
    assert [p["speedup"] for p in dense["latency"]["points"]] == [1.0, 1.0]
    assert step2["structure"]["layers"][1]["blocks"]["query"] == [3, 4]  # derived from pruning.json
    assert step1["structure"]["layers"][0]["heads_kept"] == 3
    assert summary["environment"]["cpu"] == "Test CPU" and summary["environment"]["threads"] == 1
    versions = summary["versions"]
    assert versions["torch"] == "2.13.0+cpu" and versions["onnxruntime"] == "1.31.1"
    assert versions["python"] == "3.11.7" and "onnx" in versions  # not recorded by the run: read here
    assert summary["versions_read_at_report_time"] == ["onnx"]


def test_missing_stages_are_reported_not_fatal(tmp_path):
    run = make_run(tmp_path / "run")
    layout.bench_report(run, "step2").unlink()
    layout.verify_report(run, "dense").unlink()
    (layout.opt_dir(run, "step2") / "model.onnx").unlink()
    summary = build_summary(run)
    assert summary["variants"]["step2"]["missing"] == ["optimize", "bench"]
    assert summary["variants"]["step2"]["latency"] is None
    assert (
        summary["variants"]["dense"]["missing"] == ["verify"]
        and summary["variants"]["dense"]["parity"] is None
    )
    md = render_md(build_blocks(summary, with_plots=False))
    assert "| dense | - | - | - | - | - | missing (no verify report) |" in md
    assert "- step2: optimize, bench" in md
    short = build_summary(make_run(tmp_path / "short", step2=False))
    assert short["absent_variants"] == ["step2"] and list(short["variants"]) == ["dense", "step1"]


def test_reference_point_is_1x128_or_the_first_shared_one(tmp_path):
    summary = build_summary(make_run(tmp_path / "run"))
    assert reference_point(summary) == "1x128"
    for entry in summary["variants"].values():
        entry["latency"]["points"] = [p for p in entry["latency"]["points"] if p["key"] != "1x128"]
    assert reference_point(summary) == "8x128"


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_summary(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no stage output"):
        build_summary(tmp_path / "empty")
    run = make_run(tmp_path / "run")
    layout.verify_report(run, "step1").write_text('{"stages": [')
    with pytest.raises(UserError, match=r"verify/step1.json is not valid JSON"):
        build_summary(run)
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(UserError, match="is not a summary.json"):
        load_summary(tmp_path / "other.json")


def test_pareto_front_keeps_only_undominated_points():
    pts = [
        ParetoPoint("dense", 20.0, 0.90),
        ParetoPoint("step1", 10.0, 0.89),
        ParetoPoint("slow", 15.0, 0.85),  # slower and worse than step1
        ParetoPoint("step2", 8.0, 0.86),
    ]
    assert [p.name for p in pareto_front(pts)] == ["step2", "step1", "dense"]
    assert [p.name for p in pareto_front([ParetoPoint("a", 5, 0.9), ParetoPoint("b", 5, 0.9)])] == ["a", "b"]


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_is_self_contained_with_its_pictures(tmp_path):
    run = make_run(tmp_path / "run")
    paths = write_report(run)
    assert paths == {
        "summary": run / "summary.json",
        "markdown": run / "report.md",
        "html": run / "report.html",
    }
    html = paths["html"].read_text(encoding="utf-8")
    images = _images(html)
    # Pareto plot, one structure heat map per pruned variant, speedup bars
    assert len(images) == 4 and all(
        img.startswith(b"\x89PNG\r\n\x1a\n") and len(img) > 5000 for img in images
    )
    assert "http://" not in html and "https://" not in html and "<link" not in html and "<script" not in html
    assert html.count("<table>") == 6 and "<style>" in html
    md = paths["markdown"].read_text(encoding="utf-8")
    for section in (
        "## Overview",
        "## Accuracy vs latency",
        "## Structure per layer",
        "## Parity with PyTorch",
    ):
        assert section in md
    assert "| step2 | opt/step2 | 0.8600 | 0.8600 | 0.300 |" in md
    assert "on the Pareto front: step2, step1, dense" in md
    assert "| step1 | 8x128 | 88.24 | 92.65 | 97.06 | 150.00 | 1.70x |" in md
    assert "| torch | 2.13.0+cpu |" in md and "| cpu | Test CPU |" in md
    assert json.loads(paths["summary"].read_text()) == build_summary(run)
    assert not list(run.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_report_command(tmp_path):
    import mlpruning.cli.deploy_cmds  # noqa: F401  (registers the commands)
    from mlpruning.cli.common import app

    run = make_run(tmp_path / "run", step2=False)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (
        "report.html" in result.output and (run / "report.html").is_file() and (run / "report.md").is_file()
    )


def build_real_run(masked: Path, stripped: Path, root: Path, break_pass: bool = False) -> Path:
    """A run folder filled by the real producers on the tiny fixtures: export of the dense teacher,
    the masked checkpoint's export and optimize output, verify and bench reports (tiny sizes).
    ``break_pass`` spoils one weight of the optimized model, as a faulty graph pass would."""
    from deploy.bench import BenchConfig, bench
    from deploy.verify import Tolerance, verify
    from mlpruning.core.atomic import write_json
    from pipeline.export import export_onnx

    root.mkdir(parents=True)
    (root / "teacher").symlink_to(masked / "teacher")
    (root / "step1").symlink_to(masked / "masked")
    export_onnx(masked / "teacher", layout.onnx_dir(root, "dense"))
    layout.onnx_dir(root, "step1").symlink_to(stripped / "onnx")
    shutil.copytree(stripped / "opt", layout.opt_dir(root, "step1"))
    if break_pass:
        _break_a_weight(layout.opt_dir(root, "step1"))
    for variant, reference in (("dense", masked / "teacher"), ("step1", masked / "masked")):
        stages = [layout.onnx_dir(root, variant)] + (
            [layout.opt_dir(root, variant)] if variant != "dense" else []
        )
        report = verify(stages, reference, None, masked / "glue", Tolerance())
        write_json(layout.verify_report(root, variant), report)
    cfg = BenchConfig(batches=(1,), seqs=(16,), warmup=1, rounds=2, iters=2)
    dense = layout.onnx_dir(root, "dense")
    write_json(layout.bench_report(root, "dense"), bench(dense, None, cfg))
    write_json(layout.bench_report(root, "step1"), bench(layout.opt_dir(root, "step1"), dense, cfg))
    return root


def _break_a_weight(folder: Path) -> None:
    import onnx_ir as ir

    from graph_passes.linears import find_linears, replace_tensor

    model = ir.load(folder / "model.onnx")
    manifest = json.loads((folder / "pruning.json").read_text())
    site = find_linears(model, manifest)[(1, "ffn_out")]
    replace_tensor(site.weight, site.weight.const_value.numpy() * 1.5)
    ir.save(model, folder / "model.onnx")


def test_report_reads_real_producer_output(masked, stripped, tmp_path):
    run = build_real_run(masked, stripped, tmp_path / "real")
    paths = write_report(run)
    summary = json.loads(paths["summary"].read_text())
    dense, step1 = summary["variants"]["dense"], summary["variants"]["step1"]
    assert dense["missing"] == [] and step1["missing"] == []
    assert [s["stage"] for s in step1["parity"]["stages"]] == ["export", "optimize"]
    assert step1["parity"]["passed"] and dense["parity"]["passed"]
    assert step1["metric"]["onnx"] == step1["metric"]["pytorch"] == step1["metric"]["value"] is not None
    assert 0 < step1["remaining_ratio"] < 1 and step1["params"]["after"] < step1["params"]["before"]
    (point,) = step1["latency"]["points"]
    assert point["key"] == "1x16" and point["speedup"] > 0 and point["p50_ms"] > 0
    assert (
        dense["latency"]["source"] == "bench/dense.json" and dense["latency"]["points"][0]["speedup"] == 1.0
    )
    assert summary["environment"]["provider"] and summary["versions"]["torch"]
    assert len(_images(paths["html"].read_text(encoding="utf-8"))) == 3  # Pareto, structure, speedup


def test_variants_come_from_the_run_folder_not_from_names_in_the_code(tmp_path):
    """A run whose run.json lists another variant (an INT8 copy of step 1, say) is summarized,
    reported, gated and served with no code change: every reader takes the list from the run."""
    from deploy.gate import make_baseline
    from deploy.serve import resolve_target

    run = make_run(tmp_path / "run", step2=False)
    extra = "step1-int8"
    shutil.copytree(layout.onnx_dir(run, "step1"), layout.onnx_dir(run, extra))
    shutil.copytree(layout.opt_dir(run, "step1"), layout.opt_dir(run, extra))
    _write(layout.verify_report(run, extra), _verify(run, "step1", 0.87))
    faster = {k: 2 * v for k, v in SPEEDUPS["step1"].items()}
    _write(layout.bench_report(run, extra), _bench(run, "step1", faster))
    listed = [
        {"name": "dense", "checkpoint": "teacher", "baseline": True},
        {"name": "step1", "checkpoint": "step1", "baseline": False},
        {"name": extra, "checkpoint": "step1", "baseline": False},
    ]
    _write(run / layout.RUN_STATE, {"format": 1, "variants": listed, "stages": {}})

    assert layout.present_variants(run) == ["dense", "step1", extra]
    assert layout.checkpoint_dir(run, extra) == run / "step1"
    summary = build_summary(run)
    assert list(summary["variants"]) == ["dense", "step1", extra] and summary["baseline"] == "dense"
    assert summary["variants"][extra]["metric"]["value"] == pytest.approx(0.87)
    gated = make_baseline(summary)["variants"]
    assert gated["dense"]["speedups"] == {} and gated[extra]["speedups"] == {
        k: pytest.approx(2 * v) for k, v in SPEEDUPS["step1"].items()
    }
    assert extra in write_report(run)["markdown"].read_text()
    assert resolve_target(run) == (layout.opt_dir(run, extra), run, extra)  # the last one by default
    assert resolve_target(layout.opt_dir(run, extra)) == (layout.opt_dir(run, extra), run, extra)
    with pytest.raises(UserError, match=f"unknown variant 'step2': use one of dense, step1, {extra}"):
        layout.resolve_variant(run, "step2")
