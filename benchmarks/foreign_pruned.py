"""Models pruned elsewhere (no pruning.json): optimize finds the structure from the zeros. BERT-base.

Not part of the test suite. A random BERT-base classifier is exported once (TorchScript, dense);
each variant zeroes weights of that ONNX file directly, as another tool's pruned export would
hold them, and drops the manifest:

- ``ffn-32x32``: FFN-in and FFN-out with 10% of their 32x32 blocks kept (random);
- ``ffn-16x16``: the same with 16x16 blocks;
- ``mix``: 8 of 12 heads kept in every layer (a different set per layer), 30% of the 32x32
  blocks of Q, K, V and O kept, and 40% of the FFN neurons pruned (random neurons).

With ``--legacy DIR`` (an export written by ``benchmarks/export_legacy_minilm.py``: 3 layers of
all-MiniLM-L6-v2, transformers 4.x, sentence-transformers prefix, constant heads-merge width, no
config.json), the ``legacy-minilm-l3`` variant keeps 6, 5 and 7 of the 12 heads and half of the
FFN neurons of its three layers and is optimized with ``--num-heads 12``.

Then ``mlpruning optimize`` (manifest detected, ``--block auto``) and ``mlpruning bench``
against the same zeroed model left dense (ORT CPU, 1 thread, batch 1 and 8, 128 tokens,
interleaved rounds). Parity with the input model is optimize's own run check (its max abs diff
is reported).

    .venv/bin/python benchmarks/foreign_pruned.py --out runs/foreign-pruned [--legacy DIR]
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
from strip_speed import cli, write_target  # noqa: E402

from mlpruning.core.atomic import write_json  # noqa: E402
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


def _legacy(model: ir.Model) -> None:
    rng = np.random.default_rng(0)
    for layer, pruned in enumerate((6, 5, 7)):
        zero_heads(model, layer, sorted(rng.choice(12, pruned, replace=False).tolist()), 32)
        zero_ffn_rows(model, layer, np.sort(rng.choice(1536, 768, replace=False)))


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
    parser.add_argument("--legacy", type=Path, help="export_legacy_minilm.py output: add legacy-minilm-l3")
    args = parser.parse_args()
    dense = args.out / "dense"
    if args.variants and not (dense / "onnx" / "model.onnx").is_file():
        write_target(dense / "masked", 1.0, seed=0)
        cli("export", str(dense / "masked"), "--out", str(dense / "onnx"))
    jobs = [(name, VARIANTS[name], dense / "onnx", ()) for name in args.variants]
    if args.legacy:
        jobs.append(("legacy-minilm-l3", _legacy, args.legacy, ("--num-heads", "12")))
    rows = []
    for name, prune, source, extra in jobs:
        base = args.out / name
        model = ir.load(source / "model.onnx")
        prune(model)
        src = copy_folder(source, base / "in", model)
        start = time.perf_counter()
        cli("optimize", str(src), "--out", str(base / "opt"), *extra)
        seconds = time.perf_counter() - start
        report = json.loads((base / "opt" / "optimize.json").read_text())
        bench = base / "bench.json"
        cli(
            "bench",
            str(base / "opt"),
            "--baseline",
            str(src),
            "--batch",
            "1,8",
            "--seq",
            "128",
            "--threads",
            str(args.threads),
            "--report",
            str(bench),
        )
        points = json.loads(bench.read_text())["points"]
        fast = {f"b{p['batch']}s{p['seq']}": p["speedup_median"] for p in points}
        rows.append({"variant": name, "speedup_vs_left_dense": fast, "optimize_s": round(seconds, 1)})
        rows[-1] |= _found(report)
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out / "summary.json", rows)


if __name__ == "__main__":
    main()
