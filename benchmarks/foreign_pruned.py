"""Models pruned elsewhere (no pruning.json): optimize finds the structure from the zeros. BERT-base.

Not part of the test suite. A random BERT-base classifier is exported once (TorchScript, dense);
each variant zeroes weights of that ONNX file directly, as another tool's pruned export would
hold them, and drops the manifest:

- ``ffn-32x32``: FFN-in and FFN-out with 10% of their 32x32 blocks kept (random);
- ``ffn-16x16``: the same with 16x16 blocks;
- ``mix``: 8 of 12 heads kept in every layer (a different set per layer), 30% of the 32x32
  blocks of Q, K, V and O kept, and 40% of the FFN neurons pruned (random neurons).

Then ``mlpruning optimize`` (manifest detected, ``--block auto``) and ``mlpruning bench``
against the same zeroed model left dense (ORT CPU, 1 thread, batch 1, 128 tokens, interleaved
rounds). Parity with the input model is optimize's own run check (its max abs diff is reported).

    .venv/bin/python benchmarks/foreign_pruned.py --out runs/foreign-pruned
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
from strip_speed import cli, speedup, write_target  # noqa: E402

from mlpruning.atomic import write_json  # noqa: E402
from tests.onnx_zeroing import copy_folder, zero_blocks, zero_ffn_rows, zero_heads  # noqa: E402

LAYERS, HEADS, HEAD_DIM, FFN = 12, 12, 64, 3072


def _ffn_blocks(model: ir.Model, block: tuple[int, int]) -> None:
    for layer in range(LAYERS):
        for k, name in enumerate(("ffn_in", "ffn_out")):
            zero_blocks(model, layer, name, block, 0.10, seed=2 * layer + k)


def _mix(model: ir.Model) -> None:
    rng = np.random.default_rng(0)
    for layer in range(LAYERS):
        zero_heads(model, layer, sorted(rng.choice(HEADS, 4, replace=False).tolist()), HEAD_DIM)
        zero_ffn_rows(model, layer, np.sort(rng.choice(FFN, int(0.4 * FFN), replace=False)))
        for k, name in enumerate(("query", "key", "value", "attn_out")):
            # blocks on what the heads left: zero_blocks keeps 30% of all blocks, pruned heads stay zero
            zero_blocks(model, layer, name, (32, 32), 0.30, seed=100 * layer + k)


VARIANTS = {
    "ffn-32x32": lambda m: _ffn_blocks(m, (32, 32)),
    "ffn-16x16": lambda m: _ffn_blocks(m, (16, 16)),
    "mix": _mix,
}


def _found(report: dict) -> dict:
    blocks = next(p for p in report["passes"] if p["name"] == "block_sparse")
    done = [m for m in blocks["matrices"] if m["action"] == "block_sparse"]
    return {
        "heads_rewrites": report["passes"][0]["rewrites"],
        "rows_rewrites": report["passes"][1]["rewrites"],
        "block_sparse_matrices": len(done),
        "blocks_found": sorted({"x".join(map(str, m["block"])) for m in blocks["matrices"] if m["block"]}),
        "run_check_max_abs_diff": max(report["run_check"]["max_abs_diff"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/foreign-pruned"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    dense = args.out / "dense"
    if not (dense / "onnx" / "model.onnx").is_file():
        write_target(dense / "masked", 1.0, seed=0)
        cli("export", str(dense / "masked"), "--out", str(dense / "onnx"))
    rows = []
    for name in args.variants:
        base = args.out / name
        model = ir.load(dense / "onnx" / "model.onnx")
        VARIANTS[name](model)
        src = copy_folder(dense / "onnx", base / "in", model)
        start = time.perf_counter()
        cli("optimize", str(src), "--out", str(base / "opt"))
        seconds = time.perf_counter() - start
        report = json.loads((base / "opt" / "optimize.json").read_text())
        fast = speedup(base / "opt", src, args.threads, base / "bench.json")
        rows.append({"variant": name, "speedup_vs_left_dense": fast, "optimize_s": round(seconds, 1)})
        rows[-1] |= _found(report)
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out / "summary.json", rows)


if __name__ == "__main__":
    main()
