"""Micro-benchmark: BlockSparseLinear (its function lowering in a real ORT session) vs dense MatMul.

ORT CPU with 1 intra-op thread. For each shape (in x out), token count, block shape and block
density, a random weight with a random block mask runs as one BlockSparseLinear node and as a
dense MatMul on the same weight with the pruned blocks zeroed; interleaved rounds in one process,
median of per-round dense/sparse ratios (``graph_passes.block_cost.measure``). Writes the JSON
calibration table ``graph_passes.block_cost`` reads, and prints a markdown table. Not part of
the test suite.

    .venv/bin/python benchmarks/block_sparse_micro.py --out runs/block-sparse-micro.json --balanced
    .venv/bin/python benchmarks/block_sparse_micro.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
from pathlib import Path

import onnxruntime as ort

from graph_passes.block_cost import Measurement, measure, table_json

SHAPES = ((768, 768), (768, 3072), (3072, 768))
TOKENS = (128, 1024)
BLOCKS = (32, 16)
DENSITIES = (0.5, 0.3, 0.2, 0.1)


def _key(r: Measurement) -> tuple:
    return (r.in_features, r.out_features, r.tokens, r.block, r.balanced)


def markdown(rows: list[Measurement], densities: tuple[float, ...], field: str = "speedup") -> str:
    """One line per (shape, tokens, block, mask kind); ``field`` (a speedup) per nominal density.

    Balanced masks keep a whole number of blocks per block-row, so their actual density is shown.
    """
    head = "| in x out | tokens | block | mask | dense ms | " + " | ".join(f"{d:.0%}" for d in densities)
    lines = [head + " |", "|" + "---|" * (5 + len(densities))]
    for key in sorted({_key(r) for r in rows}):
        i, o, t, b, balanced = key
        cells = sorted((r for r in rows if _key(r) == key), key=lambda r: -r.density)
        dense = sum(r.dense_ms for r in cells) / len(cells)
        speed = " | ".join(
            f"{getattr(r, field):.2f}x" + (f" ({r.density:.0%})" if balanced else "") for r in cells
        )
        kind = "balanced" if balanced else "random"
        lines.append(f"| {i}x{o} | {t} | {b[0]}x{b[1]} | {kind} | {dense:.2f} | {speed} |")
    return "\n".join(lines)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/block-sparse-micro.json"))
    parser.add_argument("--quick", action="store_true", help="768x3072, 128 tokens, 32x32, 50% and 10%")
    parser.add_argument("--balanced", action="store_true", help="also row-balanced masks")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of rounds per configuration")
    args = parser.parse_args()
    shapes, tokens, blocks, densities = SHAPES, TOKENS, BLOCKS, DENSITIES
    if args.quick:
        shapes, tokens, blocks, densities = ((768, 3072),), (128,), (32,), (0.5, 0.1)
    kinds = (False, True) if args.balanced else (False,)
    rows = []
    for shape, t, b, balanced, d in itertools.product(shapes, tokens, blocks, kinds, densities):
        row = measure(*shape, t, (b, b), d, balanced=balanced, budget_s=args.budget)
        kind = "balanced" if balanced else "random"
        print(
            f"{shape[0]}x{shape[1]} t={t} {b}x{b} {kind} {row.density:.1%}: dense {row.dense_ms:.2f} ms,"
            f" sparse {row.sparse_ms:.2f} ms, {row.speedup:.2f}x"
            f" (wall {row.wall_speedup:.2f}x, {row.rounds} rounds)",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    meta = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "onnxruntime": ort.__version__,
        "intra_op_threads": 1,
        "budget_s": args.budget,
        "timer": "thread CPU time, median of per-round dense/sparse ratios",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table_json(rows, meta), indent=1) + "\n", encoding="utf-8")
    print("Speedup over dense, thread CPU time (median of per-round ratios):\n")
    print(markdown(rows, densities))
    print("\nThe same, wall-clock time (inflated for dense when other processes take the CPU):\n")
    print(markdown(rows, densities, "wall_speedup"))


if __name__ == "__main__":
    main()
