"""Rewrite block-pruned linears into ``BlockSparseLinear`` where it measures faster.

Runs after the strip passes, so every weight is in the compact coordinates the block masks of a
step-2 checkpoint use (:mod:`pipeline.pruning.blocks`): kept heads and kept FFN rows packed in
ascending order, residual dimensions full. The manifest records per layer and matrix the torch
block (b_out, b_in) and, per block-row (b_out output features), the kept block columns. The
graph stores W^T [in, out], so the graph-layout mask is the transpose,
mask[i, j] = (input block i of output block j kept), with block (b_in, b_out).

Every entry of W^T outside the kept blocks must be zero (the masked checkpoint's contract); a
nonzero one means the manifest belongs to other weights, and the pass refuses it. Per matrix,
``mode`` decides: ``dense`` keeps MatMul, ``sparse`` always rewrites, ``auto`` times this very
weight and mask in process (:func:`graph_passes.block_cost.decide_by_measuring`, ORT CPU,
1 thread, ``tokens`` rows) and rewrites only when block-sparse is faster by the cost model's
margin. Each choice and its reason go in the report: on CPU, blocks often buy accuracy per
weight rather than speed, and the report should show that.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # RemoveUnusedNodesPass

from graph_passes.block_cost import decide_by_measuring
from graph_passes.block_sparse import replace_linear
from graph_passes.linears import LinearSite, StripReport, find_linears, linear_params
from mlpruning.errors import UserError

MODES = ("auto", "dense", "sparse")


def graph_mask(entry: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """The [in / b_in, out / b_out] mask and (b_in, b_out) block of one manifest block entry."""
    rows, cols = entry["mask_shape"]
    mask = np.zeros((rows, cols), dtype=bool)
    for r, kept in enumerate(entry["kept_block_cols"]):
        mask[r, kept] = True
    b_out, b_in = entry["block"]
    return mask.T.copy(), (b_in, b_out)


def _outside(wt: np.ndarray, mask: np.ndarray, block: tuple[int, int]) -> bool:
    """Whether ``wt`` has a nonzero entry in a pruned block."""
    bi, bo = block
    nonzero = np.abs(wt).reshape(mask.shape[0], bi, mask.shape[1], bo).sum(axis=(1, 3)) > 0
    return bool((nonzero & ~mask).any())


class BlockSparsePass(ir.passes.InPlacePass):
    """Replace block-pruned MatMuls by BlockSparseLinear nodes, per matrix, by measured cost."""

    def __init__(self, manifest: dict[str, Any], mode: str = "auto", tokens: int = 128) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"block-sparse mode {mode!r}: use one of {', '.join(MODES)}")
        self.manifest, self.mode, self.tokens = manifest, mode, tokens
        self.report = StripReport("block_sparse")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_linears(model, self.manifest)
        self.report.params_before = linear_params(model, self.manifest)
        if not self.manifest.get("block"):
            self.report.skipped.append("manifest has no block masks (step-1 checkpoint)")
        else:
            for layer, info in enumerate(self.manifest["layers"]):
                for name, entry in (info.get("blocks") or {}).items():
                    site = sites.get((layer, name))
                    if site is None:
                        self.report.skipped.append(
                            f"layer {layer} {name}: no MatMul left (stripped or bias-only)"
                        )
                        continue
                    self._site(model, site, entry)
        if self.report.rewrites:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        self.report.params_after = linear_params(model, self.manifest)
        return ir.passes.PassResult(model, modified=self.report.rewrites > 0)

    def _site(self, model: ir.Model, site: LinearSite, entry: dict[str, Any]) -> None:
        where = f"layer {site.layer} {site.name}"
        mask, block = graph_mask(entry)
        wt = site.weight.const_value.numpy()
        if wt.shape != (mask.shape[0] * block[0], mask.shape[1] * block[1]):
            self.report.skipped.append(f"{where}: weight {list(wt.shape)} does not match its block mask")
            return
        if _outside(wt, mask, block):
            raise UserError(
                f"pruning.json does not match model.onnx: {where} has nonzero weights in pruned "
                "blocks; re-export the checkpoint"
            )
        if self.mode == "dense" or mask.all():
            why = "all blocks kept" if mask.all() else "mode dense"
            self.report.skipped.append(f"{where}: {mask.mean():.0%} blocks kept, left dense ({why})")
            return
        if self.mode == "auto":
            decision = decide_by_measuring(wt, mask, block, self.tokens)
            if not decision.block_sparse:
                self.report.skipped.append(f"{where}: {decision.reason}")
                return
            self.report.notes.append(f"{where}: {decision.reason}")
        replace_linear(model, site, mask, block)
        self.report.rewrites += 1
