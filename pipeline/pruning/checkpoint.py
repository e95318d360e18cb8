"""Masked checkpoints: the contract between pruning and the ONNX stage.

A masked checkpoint is a folder with

- ``config.json``, ``model.safetensors``, tokenizer files: a plain Hugging Face checkpoint at
  full size, pruned entries set to zero (loads with ``from_pretrained``, HF keys unchanged);
- ``masks.safetensors``: boolean masks per layer, ``layer.{i}.heads`` [H],
  ``layer.{i}.attn_out`` [D], ``layer.{i}.ffn_in`` [I], ``layer.{i}.ffn_out`` [D]; after step 2
  also ``layer.{i}.{matrix}.blocks`` [R / b_out, C / b_in] for each of query, key, value,
  attn_out, ffn_in, ffn_out, in the compact coordinates of :mod:`pipeline.pruning.blocks`;
- ``scores.safetensors`` (step 1, float32, same unit keys): the final step-1 scores, which step 2
  uses to choose the rows it revives;
- ``pruning.json``: format version, step (``head_row`` or ``block``), task, base model, teacher,
  config, geometry, module paths, per-layer kept heads (indices) and rows, per-matrix kept
  counts, remaining ratio, tool version; after step 2 also per layer ``blocks`` (per matrix:
  block, mask shape and key, kept / live / total blocks, kept block columns per block-row).

Format 2 added the block entries; format-1 files are read with ``step = "head_row"``,
``block = None`` and ``row_balanced = False`` back-filled.

Loading verifies the contract: every weight entry a mask switches off must be zero (rows of Q,
K, V of pruned heads; O's columns of pruned heads and its pruned rows; pruned FFN-in rows and
the matching FFN-out columns; pruned FFN-out rows; every entry of a pruned block). The first
tensor that disagrees is named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlpruning import __version__
from mlpruning.core.contract import MANIFEST_FILE, MASKS_FILE, SCORES_FILE
from mlpruning.core.errors import UserError
from mlpruning.core.manifest import CHECKPOINT_FIX, FORMAT_VERSION, Manifest
from mlpruning.core.manifest import read_manifest as read_manifest_file
from pipeline.adapters import Geometry, adapter_for, geometry, layer_linears
from pipeline.pruning.blocks import (
    MATRICES,
    block_entry,
    block_key,
    has_blocks,
    kept_weights,
    nonzero_outside,
)
from pipeline.pruning.masks import UNITS, WIRING, full_shapes, mask_sizes, unit_sizes
from pipeline.pruning.regularizer import counted_ratio, layer_weights


def masks_to_file_keys(masks: dict[str, torch.Tensor], geo: Geometry) -> dict[str, torch.Tensor]:
    out = {
        f"layer.{i}.{u}": masks[f"layer{i}_{u}"].detach().bool().cpu().contiguous()
        for i in range(geo.num_layers)
        for u in UNITS
    }
    if has_blocks(masks):
        for i in range(geo.num_layers):
            for m in MATRICES:
                out[f"layer.{i}.{m}.blocks"] = masks[block_key(i, m)].detach().bool().cpu().contiguous()
    return out


def file_keys_to_masks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[3] == "blocks":
            out[block_key(int(parts[1]), parts[2])] = value.bool()
            continue
        if len(parts) != 3:
            raise ValueError(f"unexpected mask key {key!r}")
        out[f"layer{parts[1]}_{parts[2]}"] = value.bool()
    return out


def _matrix_counts(
    masks: dict[str, torch.Tensor], geo: Geometry, layer: int, kept: dict[tuple[int, str], int] | None
) -> dict[str, dict[str, int]]:
    m = {u: int(masks[f"layer{layer}_{u}"].sum()) for u in UNITS}
    kept_rows = {
        "heads": m["heads"] * geo.head_dim,
        "attn_out": m["attn_out"],
        "ffn_in": m["ffn_in"],
        "ffn_out": m["ffn_out"],
        None: None,
    }
    full = full_shapes(geo)
    counts = {}
    for name, wiring in WIRING.items():
        rows, cols = full[name]
        r = kept_rows[wiring.rows] if wiring.rows else rows
        c = kept_rows[wiring.cols] if wiring.cols else cols
        counts[name] = {"rows": r, "cols": c, "kept": r * c, "total": rows * cols}
    if kept is not None:  # blocks leave fewer weights than rows x cols
        for name in counts:
            counts[name]["kept"] = kept[layer, name]
    return counts


def remaining_ratio_of(masks: dict[str, torch.Tensor], geo: Geometry) -> float:
    """Kept share of the encoder weights, from unit masks and (after step 2) block masks."""
    if has_blocks(masks):
        return sum(kept_weights(masks, geo).values()) / (geo.num_layers * layer_weights(geo))
    return counted_ratio(masks, geo)


def _indices(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask.bool()).flatten().tolist()


def build_manifest(model: Any, masks: dict[str, torch.Tensor], extra: dict[str, Any]) -> Manifest:
    geo = geometry(model)
    adapter = adapter_for(model.config)
    kept = kept_weights(masks, geo) if has_blocks(masks) else None
    layers = []
    for i in range(geo.num_layers):
        heads = masks[f"layer{i}_heads"].bool()
        layers.append(
            {
                "heads_kept": _indices(heads),
                "num_heads_kept": int(heads.sum()),
                "attn_out_rows_kept": int(masks[f"layer{i}_attn_out"].sum()),
                "ffn_rows_kept": int(masks[f"layer{i}_ffn_in"].sum()),
                "ffn_out_rows_kept": int(masks[f"layer{i}_ffn_out"].sum()),
                "attn_out_rows_kept_indices": _indices(masks[f"layer{i}_attn_out"]),
                "ffn_rows_kept_indices": _indices(masks[f"layer{i}_ffn_in"]),
                "ffn_out_rows_kept_indices": _indices(masks[f"layer{i}_ffn_out"]),
                "matrices": _matrix_counts(masks, geo, i, kept),
            }
        )
        if has_blocks(masks):
            layers[-1]["blocks"] = {m: block_entry(masks, geo, i, m) for m in MATRICES}
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "masked",
        "step": "head_row",
        "block": None,
        "row_balanced": False,
        **extra,
        "geometry": geo.__dict__,
        "adapter": {
            "family": adapter.family,
            "prefix": model.base_model_prefix,
            "layers": adapter.layers,
            **adapter.linear_paths(),
        },
        "remaining_ratio": remaining_ratio_of(masks, geo),
        "encoder_weights_total": geo.num_layers * layer_weights(geo),
        "layers": layers,
        "tool_version": __version__,
    }
    return cast(Manifest, manifest)  # checked by write_manifest before it is written


def save_masks(path: Path, masks: dict[str, torch.Tensor], geo: Geometry) -> None:
    save_file(masks_to_file_keys(masks, geo), str(path), metadata={"format_version": str(FORMAT_VERSION)})


def read_manifest(ckpt: Path) -> Manifest:
    """The checkpoint's manifest through the one reader (older formats back-filled, checked)."""
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"{ckpt} is not a masked checkpoint (no {MANIFEST_FILE}): pass the output of mlpruning prune"
        )
    return read_manifest_file(path, "checkpoint")


def read_masks(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / MASKS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the masked checkpoint is incomplete")
    try:
        return file_keys_to_masks(load_file(str(path)))
    except (SafetensorError, ValueError, OSError) as exc:
        raise UserError(f"{path} is unreadable ({exc}): the masked checkpoint is corrupt") from None


def _disagree(path: str, bad: int, what: str) -> UserError:
    return UserError(
        f"tensor {path} has {bad} non-zero entries where the {what} off: masks and "
        "weights disagree; re-run mlpruning prune or restore the checkpoint"
    )


def _unit_vectors(masks: dict[str, torch.Tensor], geo: Geometry, layer: int) -> dict[str, torch.Tensor]:
    vec = {}
    for u in UNITS:
        key = f"layer{layer}_{u}"
        if key not in masks:
            raise UserError(f"masks have no entry for layer {layer} {u}: masks and model disagree in shape")
        vec[u] = masks[key].bool()
        if u == "heads":
            vec[u] = vec[u].repeat_interleave(geo.head_dim)
    return vec


def _foreign_masks(where: Path, layer: int, name: str, size: int, rows: int) -> UserError:
    return UserError(
        f"{where}: layer {layer} {name}: mask size {size} != {rows} weight rows: {MASKS_FILE} does not "
        "belong to this model.safetensors: re-run mlpruning prune"
    )


def check_masks_match(model: Any, masks: dict[str, torch.Tensor], ckpt: Path | None = None) -> None:
    """Raise a UserError naming the first weight that is non-zero where a mask is off.

    ``ckpt`` (the checkpoint folder) only makes the messages name the files.
    """
    where = ckpt / MASKS_FILE if ckpt is not None else Path(MASKS_FILE)
    geo = geometry(model)
    adapter = adapter_for(model.config)
    prefix = f"{model.base_model_prefix}." if model.base_model is not model else ""
    blocks = has_blocks(masks)
    for i, lin in enumerate(layer_linears(model)):
        vec = _unit_vectors(masks, geo, i)
        for name, wiring in WIRING.items():
            weight = getattr(lin, name).weight.detach()
            path = f"{prefix}{adapter.layers}.{i}.{getattr(adapter, name)}.weight"
            off = torch.zeros_like(weight, dtype=torch.bool)
            if wiring.rows:
                if vec[wiring.rows].numel() != weight.shape[0]:
                    raise _foreign_masks(where, i, name, vec[wiring.rows].numel(), weight.shape[0])
                off |= ~vec[wiring.rows][:, None]
            if wiring.cols:
                off |= ~vec[wiring.cols][None, :]
            bad = int((weight[off] != 0).sum())
            if bad:
                raise _disagree(path, bad, "masks are")
            bad = nonzero_outside(weight, masks, geo, i, name) if blocks else 0
            if bad:
                raise _disagree(path, bad, f"block mask layer.{i}.{name}.blocks is")


def _expected_keys(geo: Geometry, step: str) -> set[str]:
    keys = set(mask_sizes(geo))
    if step == "block":
        keys |= {block_key(i, m) for i in range(geo.num_layers) for m in MATRICES}
    return keys


def load_masked(
    ckpt: Path, attn_implementation: str | None = None
) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """Load a masked checkpoint and verify that its weights honour its masks."""
    from pipeline.models import load_for_task
    from pipeline.tasks import get_task

    manifest = read_manifest(ckpt)
    masks = read_masks(ckpt)
    model = load_for_task(str(ckpt), get_task(manifest["task"]), attn_implementation=attn_implementation)
    geo = geometry(model)
    if Geometry(**manifest["geometry"]) != geo:
        raise UserError(
            f"{ckpt / MANIFEST_FILE}: geometry {manifest['geometry']} is not the model's {geo.__dict__}: "
            f"{CHECKPOINT_FIX}"
        )
    if set(masks) != _expected_keys(geo, manifest["step"]):
        what = "block and unit masks" if manifest["step"] == "block" else "unit masks"
        raise UserError(
            f"{ckpt / MASKS_FILE} does not hold the {what} of the model's {geo.num_layers} layers: "
            "the checkpoint is corrupt; re-run mlpruning prune"
        )
    check_masks_match(model, masks, ckpt)
    return model, masks, manifest


def save_scores(path: Path, scores: dict[str, torch.Tensor], geo: Geometry) -> None:
    """Step-1 unit scores (float32, mask-file keys), so step 2 can revive the next-best rows."""
    tensors = {
        f"layer.{i}.{u}": scores[f"layer{i}_{u}"].detach().float().cpu().contiguous()
        for i in range(geo.num_layers)
        for u in UNITS
    }
    save_file(tensors, str(path), metadata={"format_version": str(FORMAT_VERSION)})


def read_scores(ckpt: Path, geo: Geometry) -> dict[str, torch.Tensor] | None:
    """Step-1 scores, or None for a checkpoint written before they were saved."""
    path = ckpt / SCORES_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, OSError) as exc:
        raise UserError(f"{path} is unreadable ({exc}): the masked checkpoint is corrupt") from None
    return _checked_scores(path, tensors, geo)


def _checked_scores(path: Path, tensors: dict[str, torch.Tensor], geo: Geometry) -> dict[str, torch.Tensor]:
    """Scores keyed like the masks; every unit's present, one score per row (revive indexes them)."""
    sizes = {f"layer.{i}.{u}": n for i in range(geo.num_layers) for u, n in unit_sizes(geo).items()}
    for key, value in tensors.items():
        if key not in sizes:
            raise UserError(f"{path}: tensor {key} is not a step-1 unit score: {CHECKPOINT_FIX}")
        if tuple(value.shape) != (sizes[key],):
            raise UserError(
                f"{path}: tensor {key} has shape {list(value.shape)}, not [{sizes[key]}]: {CHECKPOINT_FIX}"
            )
    missing = [key for key in sizes if key not in tensors]
    if missing:
        raise UserError(f"{path}: tensor {missing[0]} is missing: {CHECKPOINT_FIX}")
    return {f"layer{k.split('.')[1]}_{k.split('.')[2]}": v for k, v in tensors.items()}
