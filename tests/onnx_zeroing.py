"""Prune an exported ONNX encoder the way another tool would: zero weights, write no manifest.

Torch-free helpers for the tests of models pruned or exported elsewhere: the linears are found
through the same module-path layout detection optimize uses, and zeroed in place:

- a head: its Q/K/V output columns and biases and O's input rows;
- an FFN neuron: its FFN-in column and bias and FFN-out's input row;
- blocks: a random (bi, bo) block mask on W^T, zeroing every entry outside the kept blocks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graph_passes.detect import _layout
from graph_passes.linears import LinearSite, find_linears


def linears(model: ir.Model) -> dict[tuple[int, str], LinearSite]:
    layout = _layout(model)
    draft = {"adapter": layout["adapter"], "geometry": {"num_layers": layout["num_layers"]}}
    return find_linears(model, draft)


def _scale(site: LinearSite, cols: np.ndarray | None = None, rows: np.ndarray | None = None) -> None:
    wt = site.weight.const_value.numpy().copy()
    if cols is not None:
        wt[:, cols] = 0
        if site.bias is not None:
            bias = site.bias.const_value.numpy().copy()
            bias[cols] = 0
            site.set_bias(bias)
    if rows is not None:
        wt[rows, :] = 0
    site.set_weight(wt)


def zero_heads(model: ir.Model, layer: int, heads: list[int], head_dim: int) -> None:
    sites = linears(model)
    cols = np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    for name in ("query", "key", "value"):
        _scale(sites[(layer, name)], cols=cols)
    _scale(sites[(layer, "attn_out")], rows=cols)


def zero_ffn_rows(model: ir.Model, layer: int, rows: np.ndarray) -> None:
    sites = linears(model)
    _scale(sites[(layer, "ffn_in")], cols=rows)
    _scale(sites[(layer, "ffn_out")], rows=rows)


def zero_blocks(
    model: ir.Model, layer: int, name: str, block: tuple[int, int], density: float, seed: int = 0
) -> np.ndarray:
    """Keep a random ``density`` share of (bi, bo) blocks of W^T; returns the [in/bi, out/bo] mask."""
    site = linears(model)[(layer, name)]
    wt = site.weight.const_value.numpy()
    blocks = (wt.shape[0] // block[0], wt.shape[1] // block[1])
    rng = np.random.default_rng(seed)
    mask = np.zeros(blocks, dtype=bool)
    mask.flat[rng.choice(mask.size, size=max(1, round(density * mask.size)), replace=False)] = True
    site.set_weight(wt * np.kron(mask, np.ones(block, dtype=wt.dtype)))
    return mask


def copy_folder(src: Path, dst: Path, model: ir.Model) -> Path:
    """``src``'s files (config, tokenizer) with ``model`` as model.onnx, and no pruning.json."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx*", "pruning.json", "*.py"))
    ir.save(model, dst / "model.onnx")
    return dst
