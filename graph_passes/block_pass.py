"""Rewrite block-pruned linears into ``BlockSparseLinear`` where it measures faster.

Runs after the strip passes, so every weight is in the compact coordinates the block masks of a
step-2 checkpoint use (:mod:`pipeline.pruning.blocks`): kept heads and kept FFN rows packed in
ascending order, residual dimensions full. The manifest records per layer and matrix the torch
block (b_out, b_in) and, per block-row (b_out output features), the kept block columns. The
graph stores W^T [in, out], so the graph-layout mask is the transpose,
mask[i, j] = (input block i of output block j kept), with block (b_in, b_out).

Every entry of W^T outside the kept blocks must be zero (the masked checkpoint's contract); a
nonzero one means the manifest belongs to other weights, and the pass refuses it.

Every matrix the manifest gives no block mask (all of them for a step-1 checkpoint or a model
pruned elsewhere) is searched for all-zero blocks in its current, stripped coordinates
(:mod:`graph_passes.block_detect`); a mask found there is exact by construction and goes through
the same choice. Zeros no block covers are reported by pattern, and where they are a large share
of the matrix, a random block mask of the same density is timed on its shape, so the report says
what pruning in blocks would have bought on this target. Per matrix,
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

from graph_passes.block_cost import decide_by_measuring, measure
from graph_passes.block_detect import CANDIDATES, Block, Sparsity, detect, divides
from graph_passes.block_sparse import replace_linear
from graph_passes.linears import LinearSite, StripReport, find_linears, linear_params
from mlpruning.core.errors import UserError
from mlpruning.core.manifest import Manifest

MODES = ("auto", "dense", "sparse")
WORTH_TIMING = 0.25  # share of a matrix's weights that are zeros outside blocks, to time the what-if
DENSITY_STEP = 0.05


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
    """Replace block-pruned MatMuls by BlockSparseLinear nodes, per matrix, by measured cost.

    Block masks come from the manifest (step-2 checkpoints) or, for every other prunable
    linear, from the weights' zeros (``search``: ``auto`` tries the candidate shapes of
    :mod:`graph_passes.block_detect`, a (bi, bo) pair tries that shape alone, ``none`` skips the
    search). Either way the same checks and the same measured choice apply, and
    ``report.matrices`` says per matrix what was found and what was done with it.
    """

    def __init__(
        self, manifest: Manifest, mode: str = "auto", tokens: int = 128, search: str | Block = "auto"
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"block-sparse mode {mode!r}: use one of {', '.join(MODES)}")
        self.manifest, self.mode, self.tokens, self.search = manifest, mode, tokens, search
        self._what_if: dict[tuple[Any, ...], float] = {}
        self.report = StripReport("block_sparse")

    def _manifest_entries(self) -> dict[tuple[int, str], dict[str, Any]]:
        if not self.manifest.get("block"):
            return {}
        layers = enumerate(self.manifest["layers"])
        return {(i, name): e for i, info in layers for name, e in (info.get("blocks") or {}).items()}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_linears(model, self.manifest)
        self.report.params_before = linear_params(model, self.manifest)
        entries = self._manifest_entries()
        if not entries and self.search == "none":
            self.report.skipped.append(
                "no block masks in the manifest, and the weight search is off (--block none)"
            )
        for (layer, name), entry in entries.items():
            site = sites.get((layer, name))
            if site is None:
                self.report.skipped.append(f"layer {layer} {name}: no MatMul left (stripped or bias-only)")
                continue
            self._from_manifest(model, site, entry)
        if self.search != "none":
            searched = [s for key, s in sorted(sites.items()) if key not in entries]
            for site in searched:
                self._from_weights(model, site)
            if not any(m["source"] == "weights" for m in self.report.matrices):
                self.report.skipped.append(f"no zero weights in the {len(searched)} matrices searched")
        if self.report.rewrites:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        self.report.params_after = linear_params(model, self.manifest)
        return ir.passes.PassResult(model, modified=self.report.rewrites > 0)

    def _from_manifest(self, model: ir.Model, site: LinearSite, entry: dict[str, Any]) -> None:
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
        found = {"source": "manifest", "block": list(block), "block_density": float(mask.mean())}
        self._decide(model, site, mask, block, found)

    def _from_weights(self, model: ir.Model, site: LinearSite) -> None:
        wt = site.weight.const_value.numpy()
        candidates = CANDIDATES if self.search == "auto" else (self.search,)
        sparsity = detect(wt, candidates)  # type: ignore[arg-type]
        if sparsity.zeros == 0:
            return
        found = {"source": "weights", **sparsity.to_json()}
        what_if = self._as_blocks(site, sparsity)
        if what_if is not None:
            found["as_blocks"] = what_if
        if sparsity.block is None:
            fits = [b for b in candidates if divides(wt.shape, b)]
            why = "no all-zero block" if fits else "no candidate block divides the weight"
            self._record(site, found, "dense", f"{sparsity.zeros:.0%} zeros, {why}")
            return
        self._decide(model, site, sparsity.kept, sparsity.block, found)

    def _as_blocks(self, site: LinearSite, sparsity: Sparsity) -> dict[str, Any] | None:
        """What the zeros no kernel here uses would buy as blocks: timed on this shape, cached.

        Zeros that are unstructured, vectors or N:M cost as much as nonzeros on this target. If a
        matrix holds at least ``WORTH_TIMING`` of them, a random block mask keeping the nonzero
        share (all zeros in blocks) is timed on its shape, so the report says what pruning it
        in blocks would have given. ``auto`` mode only; one timing per shape and density step.
        """
        left = sparsity.vector + sparsity.n_m + sparsity.unstructured
        n_in, n_out = sparsity.shape
        block = next((b for b in ((32, 32), (16, 16)) if divides((n_in, n_out), b)), None)
        if self.mode != "auto" or left < WORTH_TIMING or block is None:
            return None
        density = max(DENSITY_STEP, round((1 - sparsity.zeros) / DENSITY_STEP) * DENSITY_STEP)
        key = (n_in, n_out, block, density)
        if key not in self._what_if:
            self._what_if[key] = measure(n_in, n_out, self.tokens, block, density, budget_s=0.3).speedup
        speedup = self._what_if[key]
        pattern = sparsity.vector_pattern or sparsity.n_m_pattern or "unstructured"
        self.report.notes.append(
            f"layer {site.layer} {site.name}: {left:.0%} of the weights are zeros no kernel here skips "
            f"({pattern}); pruned as {block[0]}x{block[1]} blocks at {density:.0%} density, "
            f"block-sparse measured {speedup:.2f}x vs dense on this shape"
        )
        return {"block": list(block), "block_density": density, "measured_speedup": round(speedup, 3)}

    def _record(self, site: LinearSite, found: dict[str, Any], action: str, why: str) -> None:
        """One matrix's entry in ``report.matrices``, and its reason in notes (rewritten) or skipped."""
        self.report.matrices.append({"layer": site.layer, "matrix": site.name, **found, "action": action})
        reason = f"layer {site.layer} {site.name}: {why}"
        (self.report.notes if action == "block_sparse" else self.report.skipped).append(reason)

    def _decide(
        self, model: ir.Model, site: LinearSite, mask: np.ndarray, block: Block, found: dict[str, Any]
    ) -> None:
        if self.mode == "dense" or mask.all():
            why = "all blocks kept" if mask.all() else "mode dense"
            self._record(site, found, "dense", f"{mask.mean():.0%} blocks kept, left dense ({why})")
            return
        if self.mode == "auto":
            decision = decide_by_measuring(site.weight.const_value.numpy(), mask, block, self.tokens)
            found = {**found, "measured_speedup": decision.bound}
            if not decision.block_sparse:
                self._record(site, found, "dense", decision.reason)
                return
            self._record(site, found, "block_sparse", decision.reason)
        else:
            self._record(site, found, "block_sparse", f"{mask.mean():.0%} blocks kept, mode sparse")
        replace_linear(model, site, mask, block)
        self.report.rewrites += 1
