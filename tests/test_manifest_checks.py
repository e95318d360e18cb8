"""Corrupt or hand-edited pruning manifests, scores and masks: one-line errors naming the fix.

A tiny masked checkpoint (masks chosen by hand, no training) and its ONNX export are edited the
way a user could, and every reader must refuse them with a UserError that names the file, what
is wrong and the command to re-run, never a KeyError or TypeError from deep inside.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graph_passes.optimize import optimize
from mlpruning.core.errors import UserError
from mlpruning.core.manifest import CHECKPOINT_FIX
from pipeline.adapters import Geometry
from pipeline.pruning.checkpoint import load_masked, read_manifest, read_scores
from tests.test_cli import assert_one_line_error, run_cli


def _bert(heads: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """``masked/`` (step 1, 2 layers, 4 heads of 8, FFN 64, with scores) and its export ``onnx/``."""
    from pipeline.adapters import geometry
    from pipeline.export import export_onnx
    from pipeline.pruning.checkpoint import SCORES_FILE, save_scores
    from pipeline.pruning.fixed import random_masks, write_masked

    root = tmp_path_factory.mktemp("manifests")
    model = _bert()
    geo = geometry(model)
    masks = random_masks(geo, [3, 2], 0.5, seed=1)
    write_masked(model, masks, root / "masked", "sst2")
    save_scores(root / "masked" / SCORES_FILE, {k: v.float() for k, v in masks.items()}, geo)
    export_onnx(root / "masked", root / "onnx")
    return root


def _edited(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "pruning.json").read_text())
    edit(manifest)
    (dst / "pruning.json").write_text(json.dumps(manifest))
    return dst


def _set(path: str, value: object) -> Callable[[dict], None]:
    """An edit that sets (or, for value DROP, deletes) one dotted entry; digits index lists."""

    def edit(manifest: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for key in parents:
            manifest = manifest[key]
        if value is DROP:
            del manifest[last]
        else:
            manifest[last] = value

    return edit


DROP = object()
CHECKPOINT_CASES = [
    ("format_version", "2", 'format_version is "2", not a positive integer'),
    ("task", DROP, "task is missing"),
    ("task", 3, "task is 3, not a name"),
    ("layers", DROP, "layers is missing"),
    ("geometry", DROP, "geometry is missing"),
    ("layers", "abc", 'layers is "abc", not a list of layer entries'),
    ("layers.0", {"heads": "x"}, "layers[0] lacks heads_kept, num_heads_kept"),
    ("remaining_ratio", "half", 'remaining_ratio is "half", not a number from 0 to 1'),
    ("layers.0.heads_kept", [0, 1, 99], "layers[0].heads_kept is [0, 1, 99], not a list of distinct"),
    ("layers.1.ffn_rows_kept", 65, "layers[1].ffn_rows_kept is 65, not an integer from 0 to 64"),
    ("layers.1.num_heads_kept", 4, "layers[1].num_heads_kept is 4 but layers[1].heads_kept lists 2"),
    ("geometry.num_heads", 8, "is not the model's"),
    ("step", "blocks", 'step is "blocks", not one of head_row, block'),
    ("step", "block", "block is null, not two integers"),
]


@pytest.mark.parametrize(("entry", "value", "fragment"), CHECKPOINT_CASES)
def test_corrupt_checkpoint_manifest_is_refused(tiny, tmp_path, entry, value, fragment):
    ckpt = _edited(tiny / "masked", tmp_path / "ckpt", _set(entry, value))
    with pytest.raises(UserError) as err:
        load_masked(ckpt)
    message = str(err.value)
    assert message.startswith(f"{ckpt / 'pruning.json'}: ") and fragment in message, message
    assert message.endswith(CHECKPOINT_FIX)


def test_step2_manifest_needs_its_block_entries(tiny, tmp_path):
    def to_step2(manifest: dict) -> None:
        manifest |= {"step": "block", "block": [8, 8]}

    ckpt = _edited(tiny / "masked", tmp_path / "ckpt", to_step2)
    with pytest.raises(UserError, match=r"layers\[0\] lacks blocks"):
        read_manifest(ckpt)
    entry = {"block": [8, 8], "mask_shape": [2, 4], "kept_block_cols": [[0, 1], [4]], "kept": 3}
    entry |= {"live": 8, "total": 8}
    manifest = json.loads((ckpt / "pruning.json").read_text())
    for layer in manifest["layers"]:
        layer["blocks"] = {"query": entry}
    (ckpt / "pruning.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"blocks.query.kept_block_cols\[1\] is \[4\], not a list"):
        read_manifest(ckpt)
    entry["kept_block_cols"] = [[0, 1], [3]]
    (ckpt / "pruning.json").write_text(json.dumps(manifest))
    assert read_manifest(ckpt)["step"] == "block"


def test_format_1_manifest_is_back_filled_and_accepted(tiny, tmp_path):
    def to_format_1(manifest: dict) -> None:
        for key in ("step", "block", "row_balanced"):
            del manifest[key]
        manifest["format_version"] = 1

    manifest = read_manifest(_edited(tiny / "masked", tmp_path / "old", to_format_1))
    assert (manifest["step"], manifest["block"], manifest["row_balanced"]) == ("head_row", None, False)


def test_cli_commands_on_a_checkpoint_without_layers(tiny, tmp_path, glue_dir):
    ckpt = _edited(tiny / "masked", tmp_path / "ckpt", _set("layers", DROP))
    expected = f"{ckpt / 'pruning.json'}: layers is missing: {CHECKPOINT_FIX}"
    assert_one_line_error(run_cli("inspect", str(ckpt)), expected)
    assert_one_line_error(run_cli("export", str(ckpt), "--out", str(tmp_path / "o")), expected)
    block = ("prune", "--step", "block", "--from", str(ckpt), "--block", "8", "--target", "0.6")
    out = tmp_path / "p"
    assert_one_line_error(run_cli(*block, "--out", str(out), "--data-dir", str(glue_dir)), expected)
    assert not (tmp_path / "o").exists() and not (out / "pruning.json").exists()


@pytest.mark.parametrize(
    ("key", "shape", "fragment"),
    [
        ("layer.0.ffn_in", [32], "tensor layer.0.ffn_in has shape [32], not [64]"),
        ("layer.1.heads", [4, 1], "tensor layer.1.heads has shape [4, 1], not [4]"),
        ("layer.0.ffn_in.blocks", [2, 2], "tensor layer.0.ffn_in.blocks is not a step-1 unit score"),
        ("layer.1.ffn_out", None, "tensor layer.1.ffn_out is missing"),
    ],
)
def test_wrongly_shaped_scores_are_named(tiny, tmp_path, key, shape, fragment):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny / "masked", ckpt)
    path = ckpt / "scores.safetensors"
    scores = load_file(path)
    if shape is None:
        del scores[key]
    else:
        scores[key] = torch.zeros(shape)
    save_file(scores, str(path))
    geo = Geometry(**read_manifest(ckpt)["geometry"])
    with pytest.raises(UserError) as err:
        read_scores(ckpt, geo)
    assert str(err.value) == f"{path}: {fragment}: {CHECKPOINT_FIX}"
    assert set(read_scores(tiny / "masked", geo)) == set(load_masked(tiny / "masked")[1])  # intact: same keys


def test_masks_of_another_model_name_the_file_and_the_fix(tiny, tmp_path):
    from pipeline.adapters import geometry
    from pipeline.pruning.checkpoint import save_masks
    from pipeline.pruning.fixed import random_masks

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny / "masked", ckpt)
    other = geometry(_bert(heads=2))  # same layers and widths, heads twice as wide
    save_masks(ckpt / "masks.safetensors", random_masks(other, [2, 2], 0.5), other)
    with pytest.raises(UserError) as err:
        load_masked(ckpt)
    assert str(err.value) == (
        f"{ckpt / 'masks.safetensors'}: layer 0 query: mask size 16 != 32 weight rows: masks.safetensors "
        "does not belong to this model.safetensors: re-run mlpruning prune"
    )


EXPORT_CASES = [
    ("format_version", 99, "has format 99: upgrade mlpruning to read it"),
    ("layers", DROP, ": layers is missing: re-run mlpruning export"),
    ("geometry", DROP, ": geometry is missing: re-run mlpruning export"),
    ("layers.0.heads_kept", "all", ': layers[0].heads_kept is "all", not a list of distinct indices below 4'),
    ("layers.1.ffn_rows_kept_indices", [64], ": layers[1].ffn_rows_kept_indices is [64], not a list"),
    ("layers.1", DROP, ": layers has 1 entries for geometry.num_layers 2: re-run mlpruning export"),
    ("adapter.query", None, ": adapter.query is null, not a module path: re-run mlpruning export"),
    ("block", [8], ": block is [8], not two integers of at least 1: re-run mlpruning export"),
]


@pytest.mark.parametrize(("entry", "value", "fragment"), EXPORT_CASES)
def test_corrupt_export_manifest_is_refused(tiny, tmp_path, entry, value, fragment):
    folder = _edited(tiny / "onnx", tmp_path / "onnx", _set(entry, value))
    with pytest.raises(UserError) as err:
        optimize(folder, tmp_path / "opt")
    assert str(err.value).startswith(str(folder / "pruning.json")) and fragment in str(err.value)
    assert not (tmp_path / "opt").exists()


def test_optimize_cli_on_a_future_export_manifest(tiny, tmp_path):
    folder = _edited(tiny / "onnx", tmp_path / "onnx", _set("format_version", 99))
    proc = run_cli("optimize", str(folder), "--out", str(tmp_path / "opt"))
    assert_one_line_error(proc, f"{folder / 'pruning.json'} has format 99: upgrade mlpruning")


def test_head_count_that_does_not_fit_is_named(tiny, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(tiny / "onnx", folder)
    (folder / "pruning.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 7}))
    with pytest.raises(UserError, match="config.json's num_attention_heads 7 does not divide the query"):
        optimize(folder, tmp_path / "o1")
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="--num-heads 7 does not divide the query width 32 of model.onnx"):
        optimize(folder, tmp_path / "o2", num_heads=7)
    assert optimize(folder, tmp_path / "o3", num_heads=4, scatter_rows="dense")["manifest"] == "detected"
