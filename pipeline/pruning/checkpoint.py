"""Masked checkpoints: the contract between pruning and the ONNX stage.

A masked checkpoint is a folder with

- ``config.json``, ``model.safetensors``, tokenizer files: a plain Hugging Face checkpoint at
  full size, pruned entries set to zero (loads with ``from_pretrained``, HF keys unchanged);
- ``masks.safetensors``: boolean masks per layer, ``layer.{i}.heads`` [H],
  ``layer.{i}.attn_out`` [D], ``layer.{i}.ffn_in`` [I], ``layer.{i}.ffn_out`` [D];
- ``pruning.json``: format version, step, task, base model, teacher, config, geometry, module
  paths, per-layer kept heads (indices) and rows, per-matrix kept counts, remaining ratio,
  tool version.

Loading verifies the contract: every weight entry a mask switches off must be zero (rows of Q,
K, V of pruned heads; O's columns of pruned heads and its pruned rows; pruned FFN-in rows and
the matching FFN-out columns; pruned FFN-out rows). The first tensor that disagrees is named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlpruning import __version__
from mlpruning.errors import UserError
from pipeline.adapters import Geometry, adapter_for, geometry, layer_linears
from pipeline.pruning.masks import UNITS, WIRING, mask_sizes
from pipeline.pruning.regularizer import counted_ratio, layer_weights

MASKS_FILE = "masks.safetensors"
MANIFEST_FILE = "pruning.json"
FORMAT_VERSION = 1


def masks_to_file_keys(masks: dict[str, torch.Tensor], geo: Geometry) -> dict[str, torch.Tensor]:
    return {
        f"layer.{i}.{u}": masks[f"layer{i}_{u}"].detach().bool().cpu().contiguous()
        for i in range(geo.num_layers)
        for u in UNITS
    }


def file_keys_to_masks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        _, i, unit = key.split(".")
        out[f"layer{i}_{unit}"] = value.bool()
    return out


def _matrix_counts(masks: dict[str, torch.Tensor], geo: Geometry, layer: int) -> dict[str, dict[str, int]]:
    m = {u: int(masks[f"layer{layer}_{u}"].sum()) for u in UNITS}
    kept_rows = {
        "heads": m["heads"] * geo.head_dim,
        "attn_out": m["attn_out"],
        "ffn_in": m["ffn_in"],
        "ffn_out": m["ffn_out"],
        None: None,
    }
    full = {
        "query": (geo.num_heads * geo.head_dim, geo.hidden),
        "key": (geo.num_heads * geo.head_dim, geo.hidden),
        "value": (geo.num_heads * geo.head_dim, geo.hidden),
        "attn_out": (geo.hidden, geo.num_heads * geo.head_dim),
        "ffn_in": (geo.intermediate, geo.hidden),
        "ffn_out": (geo.hidden, geo.intermediate),
    }
    counts = {}
    for name, wiring in WIRING.items():
        rows, cols = full[name]
        r = kept_rows[wiring.rows] if wiring.rows else rows
        c = kept_rows[wiring.cols] if wiring.cols else cols
        counts[name] = {"rows": r, "cols": c, "kept": r * c, "total": rows * cols}
    return counts


def _indices(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(mask.bool()).flatten()]


def build_manifest(model: Any, masks: dict[str, torch.Tensor], extra: dict[str, Any]) -> dict[str, Any]:
    geo = geometry(model)
    adapter = adapter_for(model.config)
    layers = []
    for i in range(geo.num_layers):
        heads = masks[f"layer{i}_heads"].bool()
        layers.append(
            {
                "heads_kept": [int(h) for h in torch.nonzero(heads).flatten()],
                "num_heads_kept": int(heads.sum()),
                "attn_out_rows_kept": int(masks[f"layer{i}_attn_out"].sum()),
                "ffn_rows_kept": int(masks[f"layer{i}_ffn_in"].sum()),
                "ffn_out_rows_kept": int(masks[f"layer{i}_ffn_out"].sum()),
                "attn_out_rows_kept_indices": _indices(masks[f"layer{i}_attn_out"]),
                "ffn_rows_kept_indices": _indices(masks[f"layer{i}_ffn_in"]),
                "ffn_out_rows_kept_indices": _indices(masks[f"layer{i}_ffn_out"]),
                "matrices": _matrix_counts(masks, geo, i),
            }
        )
    return {
        "format_version": FORMAT_VERSION,
        "kind": "masked",
        "step": "head_row",
        **extra,
        "geometry": geo.__dict__,
        "adapter": {
            "family": adapter.family,
            "prefix": model.base_model_prefix,
            "layers": adapter.layers,
            **adapter.linear_paths(),
        },
        "remaining_ratio": counted_ratio(masks, geo),
        "encoder_weights_total": geo.num_layers * layer_weights(geo),
        "layers": layers,
        "tool_version": __version__,
    }


def save_masks(path: Path, masks: dict[str, torch.Tensor], geo: Geometry) -> None:
    save_file(masks_to_file_keys(masks, geo), str(path), metadata={"format_version": str(FORMAT_VERSION)})


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"{ckpt} is not a masked checkpoint (no {MANIFEST_FILE}): pass the output of mlpruning prune"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}): the checkpoint is corrupt") from None
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format {manifest['format_version']}: upgrade mlpruning to read it")
    return manifest


def read_masks(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / MASKS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the masked checkpoint is incomplete")
    try:
        return file_keys_to_masks(load_file(str(path)))
    except (SafetensorError, ValueError, OSError) as exc:
        raise UserError(f"{path} is unreadable ({exc}): the masked checkpoint is corrupt") from None


def check_masks_match(model: Any, masks: dict[str, torch.Tensor]) -> None:
    """Raise a UserError naming the first weight that is non-zero where a mask is off."""
    geo = geometry(model)
    adapter = adapter_for(model.config)
    prefix = f"{model.base_model_prefix}." if model.base_model is not model else ""
    for i, lin in enumerate(layer_linears(model)):
        vec = {}
        for u in UNITS:
            key = f"layer{i}_{u}"
            if key not in masks:
                raise UserError(f"masks have no entry for layer {i} {u}: masks and model disagree in shape")
            vec[u] = masks[key].bool()
            if u == "heads":
                vec[u] = vec[u].repeat_interleave(geo.head_dim)
        for name, wiring in WIRING.items():
            weight = getattr(lin, name).weight.detach()
            off = torch.zeros_like(weight, dtype=torch.bool)
            if wiring.rows:
                if vec[wiring.rows].numel() != weight.shape[0]:
                    raise UserError(
                        f"layer {i} {name}: mask size {vec[wiring.rows].numel()} != {weight.shape[0]} rows"
                    )
                off |= ~vec[wiring.rows][:, None]
            if wiring.cols:
                off |= ~vec[wiring.cols][None, :]
            bad = int((weight[off] != 0).sum())
            if bad:
                path = f"{prefix}{adapter.layers}.{i}.{getattr(adapter, name)}.weight"
                raise UserError(
                    f"tensor {path} has {bad} non-zero entries where the masks are off: masks and "
                    "weights disagree; re-run mlpruning prune or restore the checkpoint"
                )


def load_masked(ckpt: Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """Load a masked checkpoint and verify that its weights honour its masks."""
    from pipeline.models import load_for_task
    from pipeline.tasks import get_task

    manifest = read_manifest(ckpt)
    masks = read_masks(ckpt)
    model = load_for_task(str(ckpt), get_task(manifest["task"]))
    if set(masks) != set(mask_sizes(geometry(model))):
        raise UserError(f"{ckpt / MASKS_FILE} does not match the model's {geometry(model).num_layers} layers")
    check_masks_match(model, masks)
    return model, masks, manifest
