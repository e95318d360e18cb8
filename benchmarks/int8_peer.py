"""The pipeline's INT8 variants beside the one-line alternative (not in the test suite).

A user's simplest INT8 is one call of ONNX Runtime's ``quantize_dynamic`` on an fp32 ONNX model:
default settings (per-tensor weights) or ``per_channel=True``. This script makes both one-liners
of a run's dense export and of each pruned variant's optimized model, then measures every model
the same way: accuracy and prediction agreement with its fp32 source on the task's full dev set
(ONNX Runtime, 64-example batches, as verify runs), size on disk, and the speedup against the
run's dense fp32 export from interleaved rounds (ONNX Runtime CPU, ``--threads`` threads), so
all ratios come from one session on one machine. The pipeline's own rows (``onnx/``, ``opt/``,
``quant/``) are read from the run folder as written by ``mlpruning run`` with a ``[quantize]``
table; nothing is re-quantized for them.

    .venv/bin/python benchmarks/int8_peer.py --run runs/demo --variants dense step1 step2 \
        --out benchmarks/results/int8-peer.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deploy import run_layout as L
from deploy.bench import BenchConfig, bench
from deploy.cpu_features import cpu_features
from deploy.onnx_eval import encode, open_for_eval, run_split
from deploy.quantize_parts import copy_carried
from mlpruning.core.atomic import write_json
from mlpruning.core.contract import ONNX_FILE
from mlpruning.core.jsonfile import recorded_task
from pipeline.tasks import get_task, load_split

ONE_LINERS = {"default call": {}, "per-channel": {"per_channel": True}}


def one_liner(src: Path, out: Path, options: dict[str, Any]) -> Path:
    """``quantize_dynamic(src, out, **options)`` as a user would call it, with the folder's files."""
    from onnxruntime.quantization import quantize_dynamic

    out.mkdir(parents=True)
    copy_carried(src, out)
    quantize_dynamic(src / ONNX_FILE, out / ONNX_FILE, **options)
    return out


def models(run: Path, names: list[str], work: Path) -> list[tuple[str, Path, Path]]:
    """(row label, model folder, its fp32 source) for every row of the table, fp32 rows first."""
    rows: list[tuple[str, Path, Path]] = []
    for name in names:
        fp32 = L.model_dir(run, name)
        rows.append((f"{name} fp32", fp32, fp32))
    for name in names:
        fp32 = L.model_dir(run, name)
        quant = L.quant_dir(run, f"{name}-int8")
        if quant.is_dir():
            rows.append((f"{name} INT8, mlpruning quantize", quant, fp32))
        for label, options in ONE_LINERS.items():
            rows.append(
                (f"{name} INT8, one-liner {label}", one_liner(fp32, work / f"{name}-{label}", options), fp32)
            )
    return rows


def measure(run: Path, names: list[str], threads: int, batches: tuple[int, ...]) -> dict[str, Any]:
    dense = L.model_dir(run, L.baseline(run))
    task = get_task(recorded_task(dense) or "")
    dev = load_split(task, "dev", None)
    labels = np.asarray(dev.labels)
    timing = BenchConfig(batches=batches, seqs=(128,), threads=threads, rounds=7, iters=10)
    atol, rtol = task.kind.agreement_tolerance(labels, 1e-4, 1e-3, int8=True)  # verify's at INT8
    work = Path(tempfile.mkdtemp(prefix="int8-peer-"))
    try:
        reference: dict[Path, Any] = {}  # fp32 rows come first: each is its own reference
        rows = []
        for label, folder, src in models(run, names, work):
            model = open_for_eval(folder, threads)
            result = run_split(model, task, encode(model, dev), labels)
            agree = task.kind.agreeing(reference.setdefault(src, result).outputs, result.outputs, atol, rtol)
            rows.append(
                {
                    "model": label,
                    "folder": str(folder.relative_to(run)) if folder.is_relative_to(run) else "(one-liner)",
                    "metric": round(result.metrics[task.main_metric], 4),
                    "agreement": f"{int(agree.sum())}/{len(agree)}",
                    "size_mb": round((folder / ONNX_FILE).stat().st_size / 1e6, 1),
                    "speedup": {
                        f"b{p['batch']} s{p['seq']}": p["speedup_median"]
                        for p in bench(folder, dense, timing)["points"]
                    },
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "run": str(run),
        "task": task.name,
        "main_metric": task.main_metric,
        "threads": threads,
        "cpu": cpu_features(),
        "rows": rows,
    }


def table(report: dict[str, Any]) -> str:
    keys = list(report["rows"][0]["speedup"])
    head = f"| model | dev {report['main_metric']} | agreement | size MB | " + " | ".join(keys) + " |"
    lines = [head, "|" + " --- |" * (4 + len(keys))]
    for r in report["rows"]:
        speeds = " | ".join(f"{r['speedup'][k]:.2f}x" for k in keys)
        lines.append(
            f"| {r['model']} | {100 * r['metric']:.2f}% | {r['agreement']} | {r['size_mb']} | {speeds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder with quant/ variants")
    parser.add_argument("--variants", nargs="+", default=["dense", "step1"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = measure(args.run.resolve(), args.variants, args.threads, tuple(args.batches))
    write_json(args.out, report)
    print(table(report))


if __name__ == "__main__":
    main()
