"""Speed of stripped heads/rows on a BERT-base-shaped model (not part of the test suite).

Builds a random BERT-base classifier (12 layers, hidden 768, 12 heads, FFN 3072), and for each
target remaining ratio r writes a masked checkpoint that keeps a different number of heads in
every layer and the matching share of FFN neurons (O and FFN-out output rows kept, so
r = heads/3 + 2 * ffn/3 per layer), then runs the real tools: export -> optimize -> bench
against the dense export of the same weights.

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

from mlpruning.atomic import write_json
from pipeline.adapters import geometry, layer_linears
from pipeline.models import embedded_default_dir
from pipeline.pruning.checkpoint import MANIFEST_FILE, MASKS_FILE, build_manifest, save_masks
from pipeline.pruning.masks import MaskScores, attach, detach_masks

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def masks_for(
    target: float, layers: int, heads: int, ffn: int, hidden: int, seed: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    # a different head count per layer around the target, same total
    counts = [max(1, min(heads, round(target * heads + d))) for d in ([-2, -1, 0, 1, 2, 0] * 2)[:layers]]
    for i, h in enumerate(counts):
        keep = torch.zeros(heads, dtype=torch.bool)
        keep[torch.randperm(heads, generator=gen)[:h]] = True
        rows = torch.zeros(ffn, dtype=torch.bool)
        rows[torch.randperm(ffn, generator=gen)[: round(target * ffn)]] = True
        masks |= {
            f"layer{i}_heads": keep,
            f"layer{i}_attn_out": torch.ones(hidden, dtype=torch.bool),
            f"layer{i}_ffn_in": rows,
            f"layer{i}_ffn_out": torch.ones(hidden, dtype=torch.bool),
        }
    return masks


def write_masked(folder: Path, target: float, seed: int) -> float:
    torch.manual_seed(seed)
    cfg = BertConfig(num_labels=2)  # bert-base shape
    model = BertForSequenceClassification(cfg).eval()
    geo = geometry(model)
    masks = masks_for(target, geo.num_layers, geo.num_heads, geo.intermediate, geo.hidden, seed)
    scores = MaskScores(geo)
    scores.fixed = {k: v.float() for k, v in masks.items()}
    attach(layer_linears(model), scores)
    detach_masks(layer_linears(model))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        src = embedded_default_dir() / name
        if src.exists():
            (folder / name).write_bytes(src.read_bytes())
    manifest = build_manifest(model, masks, {"task": "sst2", "target": target})
    save_masks(folder / MASKS_FILE, masks, geo)
    write_json(folder / MANIFEST_FILE, manifest)
    write_json(folder / "mlpruning.json", {"task": "sst2", "kind": "masked"})
    return manifest["remaining_ratio"]


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mlpruning.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/strip-speed"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for target in args.targets:
        base = args.out / f"r{target}"
        ratio = write_masked(base / "masked", target, seed=0)
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
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out / "summary.json", rows)


if __name__ == "__main__":
    main()
