"""The bench command: report shape, interleaved ratios, and errors (tiny models, few rounds)."""

from __future__ import annotations

import json

import pytest

from deploy.bench import BenchConfig, bench, format_table
from mlpruning.core.errors import UserError
from tests.test_cli import assert_one_line_error, run_cli


def test_report_has_every_point_with_percentiles_and_ratios(stripped):
    cfg = BenchConfig(batches=(1, 2), seqs=(16, 32), warmup=1, rounds=3, iters=2)
    report = bench(stripped / "opt", stripped / "onnx", cfg)
    assert [(p["batch"], p["seq"]) for p in report["points"]] == [(1, 16), (1, 32), (2, 16), (2, 32)]
    for p in report["points"]:
        for side in ("model", "baseline"):
            s = p[side]
            assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
            assert s["throughput_seq_per_s"] == pytest.approx(p["batch"] * 1e3 / s["p50_ms"], rel=1e-3)
        assert len(p["speedup_rounds"]) == 3 and p["speedup_median"] > 0
    env = report["environment"]
    assert env["provider"] == "CPUExecutionProvider" and env["onnxruntime"] and env["cpu"]
    assert "speedup" in format_table(report)


def test_without_baseline_there_is_no_ratio(stripped):
    report = bench(stripped / "opt", None, BenchConfig(batches=(1,), seqs=(8,), warmup=1, rounds=2, iters=1))
    assert "speedup_median" not in report["points"][0] and "baseline" not in report["points"][0]


def test_bad_bench_input(stripped, tmp_path):
    with pytest.raises(UserError, match="has no model.onnx"):
        bench(tmp_path, None, BenchConfig())
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        BenchConfig(batches=(0,))
    with pytest.raises(UserError, match=r"--seq 384 is longer than .* \(\d+ positions\): pass --seq"):
        bench(stripped / "opt", None, BenchConfig(seqs=(128, 384)))  # the CLI's default on a short model
    assert_one_line_error(run_cli("bench", str(stripped / "opt"), "--batch", "x"), "--batch takes integers")
    out = tmp_path / "b.json"
    proc = run_cli(
        "bench",
        str(stripped / "opt"),
        "--batch",
        "1",
        "--seq",
        "8",
        "16",
        "--rounds",
        "1",
        "--iters",
        "1",
        "--report",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert [p["seq"] for p in json.loads(out.read_text())["points"]] == [8, 16]  # "--seq 8 16" form


def test_list_flags_take_spaces_commas_or_repeats():
    from mlpruning.cli.common import spread_list_flags

    argv = ["bench", "m", "--batch", "1", "8", "--seq", "128,384", "--threads", "2"]
    assert spread_list_flags(argv) == [
        "bench",
        "m",
        "--batch",
        "1",
        "--batch",
        "8",
        "--seq",
        "128,384",
        "--threads",
        "2",
    ]
