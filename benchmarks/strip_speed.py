"""Speed and parity of stripped heads/rows on a BERT-base-shaped model (not in the test suite).

Builds a random BERT-base classifier (12 layers, hidden 768, 12 heads, FFN 3072), and for each
target remaining ratio r writes a masked checkpoint (``pipeline.pruning.fixed``) that keeps a
different number of heads in every layer (mean ~ 12 r) and the FFN share that makes the
encoder's remaining ratio r exactly (per layer r = heads/36 + 2/3 ffn share, O and FFN-out rows
kept). Then the real tools run: export -> optimize -> bench against the dense export of the same
weights, and the stripped ONNX is compared with the masked PyTorch model on padded batches.

    .venv/bin/python benchmarks/strip_speed.py --out runs/strip-speed --targets 0.5 0.3 0.2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from deploy.random_parity import random_parity
from mlpruning.core.atomic import write_json
from pipeline.adapters import geometry
from pipeline.pruning.fixed import random_masks, write_masked

SPREAD = (-2, -1, 0, 1, 2, 0, 1, -1, 2, -2, 0, 0)  # per-layer head offsets, summing to 0


def write_target(folder: Path, target: float, seed: int, ffn_multiple: int = 1) -> float:
    """A masked checkpoint at remaining ratio ``target`` (FFN rows a multiple of ``ffn_multiple``)."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(num_labels=2)).eval()  # bert-base shape
    geo = geometry(model)
    if target >= 1.0:
        heads, ffn_share = [geo.num_heads] * geo.num_layers, 1.0
    else:
        mean = round(target * geo.num_heads)
        heads = [max(1, min(geo.num_heads, mean + d)) for d in SPREAD[: geo.num_layers]]
        ffn_share = (target - sum(heads) / len(heads) / (3 * geo.num_heads)) * 1.5
        rows = round(ffn_share * geo.intermediate / ffn_multiple) * ffn_multiple
        ffn_share = rows / geo.intermediate
    masks = random_masks(geo, heads, ffn_share, seed=seed)
    return write_masked(model, masks, folder, "sst2", {"target": target})["remaining_ratio"]


def parity(masked: Path, opt: Path) -> float:
    return random_parity(masked, opt / "model.onnx", ((1, 128), (4, 77)), seed=0, pad_from=0.5)


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mlpruning.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return proc.stdout


def speedup(model: Path, baseline: Path, threads: int, report: Path) -> float:
    cli(
        "bench",
        str(model),
        "--baseline",
        str(baseline),
        "--batch",
        "1",
        "--seq",
        "128",
        "--threads",
        str(threads),
        "--report",
        str(report),
    )
    return json.loads(report.read_text())["points"][0]["speedup_median"]


def compare_dynamo(base: Path, threads: int) -> dict[str, float]:
    """The same weights exported by dynamo, dense and stripped, timed against the TorchScript ones."""
    cli("export", str(base / "masked"), "--out", str(base / "dyn-onnx"), "--exporter", "dynamo")
    cli("optimize", str(base / "dyn-onnx"), "--out", str(base / "dyn-opt"))
    return {
        "torchscript_vs_dynamo_dense": speedup(
            base / "onnx", base / "dyn-onnx", threads, base / "ts-vs-dyn-dense.json"
        ),
        "torchscript_vs_dynamo_stripped": speedup(
            base / "opt", base / "dyn-opt", threads, base / "ts-vs-dyn-opt.json"
        ),
        "dynamo_parity_max_abs_diff": parity(base / "masked", base / "dyn-opt"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/strip-speed"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--compare-dynamo", action="store_true", help="also time dynamo exports vs TorchScript"
    )
    args = parser.parse_args()
    rows = []
    for target in args.targets:
        base = args.out / f"r{target}"
        ratio = write_target(base / "masked", target, seed=0)
        cli("export", str(base / "masked"), "--out", str(base / "onnx"))
        cli("optimize", str(base / "onnx"), "--out", str(base / "opt"))
        cli(
            "bench",
            str(base / "opt"),
            "--baseline",
            str(base / "onnx"),
            "--batch",
            "1",
            "--seq",
            "128",
            "--threads",
            str(args.threads),
            "--report",
            str(base / "bench.json"),
        )
        point = json.loads((base / "bench.json").read_text())["points"][0]
        rows.append(
            {
                "target": target,
                "remaining_ratio": round(ratio, 4),
                "dense_p50_ms": point["baseline"]["p50_ms"],
                "stripped_p50_ms": point["model"]["p50_ms"],
                "speedup_median": point["speedup_median"],
                "parity_max_abs_diff": parity(base / "masked", base / "opt"),
            }
        )
        if args.compare_dynamo:
            rows[-1] |= compare_dynamo(base, args.threads)
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out / "summary.json", rows)


if __name__ == "__main__":
    main()
