"""The pruning manifest (``pruning.json``): its one reader, its one writer, and their checks.

The manifest is input to later commands, and a user can hand them a hand-edited, truncated or
foreign one. Its readers index it freely (``manifest["layers"][i]["heads_kept"]``), so a missing
key or a value of the wrong type would otherwise surface as a KeyError or TypeError deep inside
a summary table or a graph pass. Both sides of the pipeline check it here, against the schema
``pipeline.pruning.checkpoint.build_manifest`` writes:

- :func:`check_masked_manifest`: a masked checkpoint's manifest (step 1 ``head_row`` or step 2
  ``block``; format-1 files carry no step-2 keys, which the reader back-fills first);
- :func:`check_export_manifest`: an exported ONNX folder's manifest, as far as the graph passes
  read it (a ``detected`` manifest has no task, step or ratio).

:func:`read_manifest` reads, back-fills older formats and checks, and returns a
:class:`Manifest` (a ``TypedDict``: the checked keys with their types);
:func:`write_manifest` checks what it writes the same way. A problem is one UserError
``<path>: <what is wrong>: <fix>``. The format is specified in ``docs/formats.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

from mlpruning.core.atomic import write_json
from mlpruning.core.contract import LINEARS, Geometry
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json

FORMAT_VERSION = 2  # the format build_manifest writes; readers refuse newer files
CHECKPOINT_FIX = "the checkpoint is corrupt, re-run mlpruning prune"
EXPORT_FIX = "re-run mlpruning export"
STEPS = ("head_row", "block")
GEOMETRY_KEYS = tuple(f.name for f in fields(Geometry))
# per-layer index lists and the geometry entry that bounds them
INDEX_LISTS = {
    "heads_kept": "num_heads",
    "attn_out_rows_kept_indices": "hidden",
    "ffn_rows_kept_indices": "intermediate",
    "ffn_out_rows_kept_indices": "hidden",
}
# per-layer counts: (geometry bound, the index list they count)
COUNTS = {
    "num_heads_kept": ("num_heads", "heads_kept"),
    "attn_out_rows_kept": ("hidden", "attn_out_rows_kept_indices"),
    "ffn_rows_kept": ("intermediate", "ffn_rows_kept_indices"),
    "ffn_out_rows_kept": ("hidden", "ffn_out_rows_kept_indices"),
}
BLOCK_ENTRY_KEYS = ("block", "mask_shape", "kept_block_cols", "kept", "live", "total")


class BlockEntry(TypedDict):
    """Step 2, one matrix: the kept [b_out, b_in] blocks, by block-row."""

    block: list[int]  # [b_out, b_in]
    mask_shape: list[int]  # [block-rows, block-cols]
    kept_block_cols: list[list[int]]  # per block-row, its kept block-columns
    kept: int
    live: int  # kept blocks whose rows and columns survive step 1
    total: int


class LayerEntry(TypedDict, total=False):
    """One encoder layer: what the masks keep (index lists are in the original numbering)."""

    heads_kept: list[int]
    num_heads_kept: int
    attn_out_rows_kept: int
    ffn_rows_kept: int
    ffn_out_rows_kept: int
    attn_out_rows_kept_indices: list[int]
    ffn_rows_kept_indices: list[int]
    ffn_out_rows_kept_indices: list[int]
    matrices: dict[str, Any]
    blocks: dict[str, BlockEntry]  # keyed by LINEARS; step 2 only


class Adapter(TypedDict):
    """Module paths of the six prunable linears, relative to ``prefix`` + ``layers``.<i>."""

    family: str
    prefix: str
    layers: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: str
    ffn_out: str


class Manifest(TypedDict, total=False):
    """``pruning.json`` as :func:`read_manifest` returns it: every key below is checked for its
    type and range before a stage sees it (``docs/formats.md`` has the rest of the keys)."""

    format_version: int
    kind: Literal["masked", "dense", "detected"]
    source: str  # a detected manifest: what it was derived from
    task: str
    step: Literal["head_row", "block"]
    block: list[int] | None  # [b_out, b_in] for step 2
    row_balanced: bool
    remaining_ratio: float
    remaining_ratio_of_step1: float | None
    geometry: dict[str, int]  # Geometry's fields
    adapter: Adapter
    layers: list[LayerEntry]


class _Bad(Exception):
    """What is wrong with one entry; :func:`_reported` adds the file and the fix."""


@contextmanager
def _reported(path: Path, fix: str) -> Iterator[None]:
    try:
        yield
    except _Bad as exc:
        raise UserError(f"{path}: {exc}: {fix}") from None


def _show(value: Any) -> str:
    """A JSON value as the file spells it, or its kind when that would flood the line."""
    text = json.dumps(value)
    if len(text) <= 40:
        return text
    if isinstance(value, dict):
        return "an object"
    return f"a list of {len(value)}" if isinstance(value, list) else "a long string"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def _get(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise _Bad(f"{key} is missing")
    return obj[key]


def _int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
        raise _Bad(f"{name} is {_show(value)}, not an integer {bound}")
    return value


def _indices(value: Any, name: str, below: int) -> list[int]:
    ok = isinstance(value, list) and all(_is_int(v) and 0 <= v < below for v in value)
    if not ok or len(set(value)) != len(value):
        raise _Bad(f"{name} is {_show(value)}, not a list of distinct indices below {below}")
    return value


def _pair(value: Any, name: str, lo: int) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v >= lo for v in value)):
        raise _Bad(f"{name} is {_show(value)}, not two integers of at least {lo}")
    return value[0], value[1]


def _ratio(value: Any, name: str, hi: float | None) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (hi is not None and value > hi):
        bound = f"from 0 to {hi:g}" if hi is not None else "of at least 0"
        raise _Bad(f"{name} is {_show(value)}, not a number {bound}")


def _format(manifest: dict[str, Any], path: Path) -> None:
    version = manifest.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise _Bad(f"format_version is {_show(version)}, not a positive integer")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has format {version}: upgrade mlpruning to read it")


def _geometry(manifest: dict[str, Any]) -> dict[str, int]:
    geo = _get(manifest, "geometry")
    if not isinstance(geo, dict) or set(geo) != set(GEOMETRY_KEYS):
        raise _Bad(f"geometry is {_show(geo)}, not an object of {', '.join(GEOMETRY_KEYS)}")
    for key in GEOMETRY_KEYS:
        _int(geo[key], f"geometry.{key}", 1)
    return geo


def _block_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise _Bad(f"{where} is {_show(entry)}, not a block entry")
    missing = [k for k in BLOCK_ENTRY_KEYS if k not in entry]
    if missing:
        raise _Bad(f"{where} lacks {', '.join(missing)}")
    _pair(entry["block"], f"{where}.block", 1)
    rows, cols = _pair(entry["mask_shape"], f"{where}.mask_shape", 0)
    kept_cols = entry["kept_block_cols"]
    if not isinstance(kept_cols, list) or len(kept_cols) != rows:
        raise _Bad(f"{where}.kept_block_cols is {_show(kept_cols)}, not {rows} block-rows (its mask_shape)")
    for r, row in enumerate(kept_cols):
        _indices(row, f"{where}.kept_block_cols[{r}]", cols)
    for key in ("kept", "live", "total"):
        _int(entry[key], f"{where}.{key}", 0, rows * cols)


def _layer(layer: Any, where: str, geo: dict[str, int], required: tuple[str, ...]) -> None:
    """Types and ranges of every entry the readers use; ``required`` ones must be there."""
    if not isinstance(layer, dict):
        raise _Bad(f"{where} is {_show(layer)}, not a layer entry")
    missing = [k for k in required if k not in layer]
    if missing:
        raise _Bad(f"{where} lacks {', '.join(missing)}")
    for key, bound in INDEX_LISTS.items():
        if key in layer:
            _indices(layer[key], f"{where}.{key}", geo[bound])
    for key, (bound, _) in COUNTS.items():
        if key in layer:
            _int(layer[key], f"{where}.{key}", 0, geo[bound])
    if "blocks" in layer:
        blocks = layer["blocks"]
        if not isinstance(blocks, dict) or not set(blocks) <= set(LINEARS):
            raise _Bad(f"{where}.blocks is {_show(blocks)}, not an object keyed by {', '.join(LINEARS)}")
        for name, entry in blocks.items():
            _block_entry(entry, f"{where}.blocks.{name}")


def _layers(manifest: dict[str, Any], geo: dict[str, int], required: tuple[str, ...]) -> list[dict]:
    layers = _get(manifest, "layers")
    if not isinstance(layers, list):
        raise _Bad(f"layers is {_show(layers)}, not a list of layer entries")
    if len(layers) != geo["num_layers"]:
        raise _Bad(f"layers has {len(layers)} entries for geometry.num_layers {geo['num_layers']}")
    for i, layer in enumerate(layers):
        _layer(layer, f"layers[{i}]", geo, required)
    return layers


def _counts_agree(layer: dict[str, Any], where: str) -> None:
    """A count the summary shows must be the length of the index list it counts."""
    for key, (_, listed) in COUNTS.items():
        if listed in layer and layer[key] != len(layer[listed]):
            raise _Bad(f"{where}.{key} is {layer[key]} but {where}.{listed} lists {len(layer[listed])}")


def _names(manifest: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """Task and model names: non-empty strings (optional ones may be null or absent)."""
    for key in required + optional:
        value = _get(manifest, key) if key in required else manifest.get(key)
        if (value is not None or key in required) and not (isinstance(value, str) and value):
            raise _Bad(f"{key} is {_show(value)}, not a name")


def check_masked_manifest(manifest: Manifest | dict[str, Any], path: Path) -> None:
    """Raise a UserError unless ``manifest`` (step-2 keys back-filled) is a masked checkpoint's."""
    with _reported(path, CHECKPOINT_FIX):
        _format(manifest, path)
        _names(manifest, ("task",), ("teacher", "base_model", "student_init"))
        step = _get(manifest, "step")
        if step not in STEPS:
            raise _Bad(f"step is {_show(step)}, not one of {', '.join(STEPS)}")
        if not isinstance(manifest.get("row_balanced"), bool):
            raise _Bad(f"row_balanced is {_show(manifest.get('row_balanced'))}, not true or false")
        if step == "block" or manifest.get("block") is not None:
            _pair(manifest.get("block"), "block", 1)
        _ratio(_get(manifest, "remaining_ratio"), "remaining_ratio", 1.0)
        if manifest.get("remaining_ratio_of_step1") is not None:
            _ratio(manifest["remaining_ratio_of_step1"], "remaining_ratio_of_step1", None)
        geo = _geometry(manifest)
        required = ("heads_kept", *COUNTS) + (("blocks",) if step == "block" else ())
        for i, layer in enumerate(_layers(manifest, geo, required)):
            _counts_agree(layer, f"layers[{i}]")


def check_export_manifest(manifest: Manifest | dict[str, Any], path: Path) -> None:
    """Raise a UserError unless the graph passes can read ``manifest`` (an export's pruning.json)."""
    with _reported(path, EXPORT_FIX):
        _format(manifest, path)
        adapter = manifest.get("adapter")
        if adapter is None or (isinstance(adapter, dict) and "prefix" not in adapter):
            raise UserError(f"{path} predates row indices: {EXPORT_FIX}")
        if not isinstance(adapter, dict):
            raise _Bad(f"adapter is {_show(adapter)}, not an object of module paths")
        for key in ("prefix", "layers", *LINEARS):
            if not isinstance(adapter.get(key), str):
                raise _Bad(f"adapter.{key} is {_show(adapter.get(key))}, not a module path")
        if manifest.get("block"):  # the block pass reads block entries only then
            _pair(manifest["block"], "block", 1)
        _layers(manifest, _geometry(manifest), ("heads_kept", "ffn_rows_kept_indices"))


def _backfill(manifest: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (step 1 only) lacks the step-2 keys: they read as a step-1 manifest."""
    manifest.setdefault("step", "head_row")
    manifest.setdefault("block", None)
    manifest.setdefault("row_balanced", False)
    return manifest


def read_manifest(path: Path, kind: str) -> Manifest:
    """The one reader of ``pruning.json``: a ``checkpoint``'s or an ``export``'s, back-filled and checked.

    A missing, corrupt, newer-format or malformed file is one UserError naming the fix.
    """
    fix = CHECKPOINT_FIX if kind == "checkpoint" else EXPORT_FIX
    manifest = read_json(path, fix)
    if manifest is None:
        raise UserError(f"{path} is missing: {fix}")
    if kind == "checkpoint":
        check_masked_manifest(_backfill(manifest), path)
    else:
        check_export_manifest(manifest, path)
    return cast(Manifest, manifest)  # checked above: the keys a Manifest names have its types


def write_manifest(path: Path, manifest: Manifest | dict[str, Any], kind: str) -> None:
    """The one writer: checks ``manifest`` as its reader will, then writes it atomically."""
    (check_masked_manifest if kind == "checkpoint" else check_export_manifest)(manifest, path)
    write_json(path, manifest)
