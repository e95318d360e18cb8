"""Masked checkpoints from masks chosen by hand (benchmarks, tests, masks imported from elsewhere).

``write_masked`` applies boolean head/row masks to a model exactly as training would (through
the same parametrizations, then baked in), and writes the same folder a ``prune`` run writes:
HF weights with zeros, ``masks.safetensors``, ``pruning.json`` and ``mlpruning.json``.
``random_masks`` draws masks with a chosen number of heads per layer and a share of FFN rows,
which is how the speed benchmarks reach an exact remaining ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mlpruning.core.atomic import staging_dir, write_json
from mlpruning.core.contract import TOKENIZER_FILES
from mlpruning.core.manifest import write_manifest
from pipeline.adapters import Geometry, geometry, layer_linears
from pipeline.evaluate import METADATA_FILE
from pipeline.models import embedded_default_dir
from pipeline.pruning.checkpoint import MANIFEST_FILE, MASKS_FILE, build_manifest, save_masks
from pipeline.pruning.masks import MaskScores, attach, detach_masks


def random_masks(
    geo: Geometry,
    heads_per_layer: list[int],
    ffn_share: float,
    seed: int = 0,
    out_rows_share: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Masks keeping ``heads_per_layer[i]`` random heads and ``ffn_share`` of FFN rows per layer.

    ``out_rows_share`` < 1 also drops that share's complement of O and FFN-out output rows.
    """
    if len(heads_per_layer) != geo.num_layers:
        raise ValueError(f"heads_per_layer: {len(heads_per_layer)} entries for {geo.num_layers} layers")
    gen = torch.Generator().manual_seed(seed)

    def keep(n: int, k: int) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=gen)[:k]] = True
        return mask

    masks = {}
    for i, h in enumerate(heads_per_layer):
        masks |= {
            f"layer{i}_heads": keep(geo.num_heads, h),
            f"layer{i}_attn_out": keep(geo.hidden, round(out_rows_share * geo.hidden)),
            f"layer{i}_ffn_in": keep(geo.intermediate, round(ffn_share * geo.intermediate)),
            f"layer{i}_ffn_out": keep(geo.hidden, round(out_rows_share * geo.hidden)),
        }
    return masks


def write_masked(
    model: Any, masks: dict[str, torch.Tensor], folder: Path, task: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Bake ``masks`` into ``model`` and write a masked checkpoint folder; returns the manifest."""
    geo = geometry(model)
    scores = MaskScores(geo)
    scores.fixed = {k: v.float() for k, v in masks.items()}
    attach(layer_linears(model), scores)
    detach_masks(layer_linears(model))
    manifest = build_manifest(model, masks, {"task": task, **(extra or {})})
    with staging_dir(folder) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            src = embedded_default_dir() / name
            if src.exists():
                (tmp / name).write_bytes(src.read_bytes())
        save_masks(tmp / MASKS_FILE, masks, geo)
        write_manifest(tmp / MANIFEST_FILE, manifest, "checkpoint")
        write_json(tmp / METADATA_FILE, {"task": task, "kind": "masked"})
    return manifest
