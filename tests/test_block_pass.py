"""The block-sparse pass: manifest block masks -> BlockSparseLinear, same outputs as dense MatMul.

The stripped tiny model gets random 8x8 block masks on every matrix whose compact shape divides
by 8 (its weights zeroed outside the kept blocks, as a step-2 checkpoint would have them) and a
manifest entry per mask in the step-2 format (torch layout, kept block columns per block-row).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes.block_pass import BlockSparsePass, graph_mask
from graph_passes.linears import find_linears
from mlpruning.core.errors import UserError

BLOCK = 8


def _blocked(stripped) -> tuple[ir.Model, dict]:
    manifest = json.loads((stripped / "opt" / "pruning.json").read_text())
    model = ir.load(stripped / "opt" / "model.onnx")
    manifest["block"] = [BLOCK, BLOCK]
    rng = np.random.default_rng(0)
    for (layer, name), site in find_linears(model, manifest).items():
        wt = site.weight.const_value.numpy()
        if wt.shape[0] % BLOCK or wt.shape[1] % BLOCK:
            continue
        mask = rng.random((wt.shape[0] // BLOCK, wt.shape[1] // BLOCK)) < 0.5  # graph layout
        mask[:, 0] = False  # an empty output block-row: those outputs are the bias alone
        site.set_weight(wt * np.kron(mask, np.ones((BLOCK, BLOCK), wt.dtype)))
        torch_mask = mask.T
        manifest["layers"][layer].setdefault("blocks", {})[name] = {
            "block": [BLOCK, BLOCK],
            "mask_shape": list(torch_mask.shape),
            "kept": int(torch_mask.sum()),
            "kept_block_cols": [np.flatnonzero(row).tolist() for row in torch_mask],
        }
    return model, manifest


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feed
    )[0]


def _feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((3, 21), np.int64)
    mask[-1, 9:] = 0
    ids = rng.integers(1000, 9000, (3, 21), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_block_masks_become_block_sparse_nodes_with_equal_outputs(stripped):
    model, manifest = _blocked(stripped)
    entries = sum(len(layer.get("blocks", {})) for layer in manifest["layers"])
    assert entries >= 6
    want = _run(model, _feed())
    p = BlockSparsePass(manifest, "sparse")
    p(model)
    assert p.report.rewrites == entries and p.report.params_after < p.report.params_before
    assert sum(n.op_type == "BlockSparseLinear" for n in model.graph) == entries
    assert np.abs(_run(model, _feed()) - want).max() <= 1e-5


def test_dense_mode_and_mismatch(stripped):
    model, manifest = _blocked(stripped)
    p = BlockSparsePass(copy.deepcopy(manifest), "dense", search="none")
    p(model)
    assert p.report.rewrites == 0 and all("left dense" in r for r in p.report.skipped)
    layer, (name, entry) = next(
        (i, next(iter(x["blocks"].items()))) for i, x in enumerate(manifest["layers"])
    )
    entry["kept_block_cols"] = [[] for _ in entry["kept_block_cols"]]  # claims every block pruned
    with pytest.raises(UserError, match=f"layer {layer} {name} has nonzero weights in pruned blocks"):
        BlockSparsePass(manifest, "sparse")(model)


def test_graph_mask_is_the_transpose_of_the_torch_mask():
    entry = {"block": [16, 32], "mask_shape": [2, 3], "kept_block_cols": [[0, 2], [1]]}
    mask, block = graph_mask(entry)
    assert block == (32, 16) and mask.tolist() == [[True, False], [False, True], [True, False]]
