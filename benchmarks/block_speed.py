"""Where the weights go at 20%: heads/rows stripped vs stripped + blocks vs blocks alone (BERT-base).

Not part of the test suite. On a random BERT-base classifier (same weights for every variant):

- ``strip``: step-1-style masks at r 0.2 (heads and FFN rows), export, optimize;
- ``strip+blocks``: masks at r 0.4 (FFN rows a multiple of 32), stripped, then 50% random 32x32
  blocks kept in every matrix (weights outside zeroed in the stripped graph, block entries added
  to the manifest), then the block-sparse pass;
- ``blocks``: the dense export with 20% random 32x32 blocks kept in every matrix.

The block variants zero weights directly in the stripped ONNX graph, which is what a step-2
checkpoint would export; the block pass then chooses per matrix by timing (``--mode auto``) or
always rewrites (``--mode sparse``). Each variant is benchmarked against the dense export
(ORT CPU, batch 1, 128 tokens, interleaved rounds).

    .venv/bin/python benchmarks/block_speed.py --out runs/block-speed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).parent))
from strip_speed import cli, speedup, write_target

from graph_passes.block_pass import BlockSparsePass
from graph_passes.linears import find_linears, linear_params
from mlpruning.core.atomic import write_json

BLOCK = 32


def add_blocks(src: Path, dst: Path, density: float, mode: str, seed: int = 0) -> dict:
    """Copy ``src`` (an optimized folder) to ``dst`` with random blocks kept and the block pass run."""
    manifest = json.loads((src / "pruning.json").read_text())
    model = ir.load(src / "model.onnx")
    manifest["block"] = [BLOCK, BLOCK]
    rng = np.random.default_rng(seed)
    before = linear_params(model, manifest)
    for (layer, name), site in find_linears(model, manifest).items():
        wt = site.weight.const_value.numpy()
        if wt.shape[0] % BLOCK or wt.shape[1] % BLOCK:
            continue
        mask = rng.random((wt.shape[0] // BLOCK, wt.shape[1] // BLOCK)) < density
        site.set_weight(wt * np.kron(mask, np.ones((BLOCK, BLOCK), wt.dtype)))
        manifest["layers"][layer].setdefault("blocks", {})[name] = {
            "block": [BLOCK, BLOCK],
            "mask_shape": list(mask.T.shape),
            "kept_block_cols": [np.flatnonzero(row).tolist() for row in mask.T],
        }
    kept = sum(
        int(np.count_nonzero(s.weight.const_value.numpy())) for s in find_linears(model, manifest).values()
    )
    p = BlockSparsePass(manifest, mode)
    p(model)
    dst.mkdir(parents=True, exist_ok=True)
    ir.save(model, dst / "model.onnx")
    for name in ("config.json", "export.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    write_json(dst / "pruning.json", manifest)
    return {"rewrites": p.report.rewrites, "nonzero_linear_weights": kept, "params_before": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/block-speed"))
    parser.add_argument("--mode", choices=("auto", "sparse"), default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out, rows = args.out, []
    for name, target in (("dense", 1.0), ("r0.2", 0.2), ("r0.4", 0.4)):
        write_target(out / name / "masked", target, seed=0, ffn_multiple=BLOCK)
        cli("export", str(out / name / "masked"), "--out", str(out / name / "onnx"))
        cli("optimize", str(out / name / "onnx"), "--out", str(out / name / "opt"), "--scatter-rows", "dense")
    total = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    variants = {
        "strip": (out / "r0.2" / "opt", None),
        "strip+blocks": (out / "r0.4" / "opt", 0.5),
        "blocks": (out / "dense" / "opt", 0.2),
    }
    for label, (src, density) in variants.items():
        folder, info = src, {}
        if density is not None:
            folder = out / label.replace("+", "-")
            info = add_blocks(src, folder, density, args.mode)
        ratio = info.get("nonzero_linear_weights")
        if ratio is None:
            ratio = sum(
                int(np.count_nonzero(s.weight.const_value.numpy()))
                for s in find_linears(
                    ir.load(folder / "model.onnx"), json.loads((folder / "pruning.json").read_text())
                ).values()
            )
        fast = speedup(folder, out / "dense" / "onnx", args.threads, folder / "bench.json")
        rows.append(
            {"variant": label, "remaining_ratio": round(ratio / total, 4), "speedup_vs_dense": fast, **info}
        )
        print(json.dumps(rows[-1]), flush=True)
    write_json(out / "summary.json", rows)


if __name__ == "__main__":
    main()
