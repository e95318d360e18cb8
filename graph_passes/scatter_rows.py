"""Compute only the kept output rows of O and FFN-out, and scatter them back into the residual.

O and FFN-out write the residual stream, whose width never shrinks: a pruned output row j of
these matrices still receives its bias b_j. With kept rows K (k of n) and graph weights W^T
[in, n], the pass computes

    z = x @ [W^T[:, K] | 0]          [..., k + 1]   (one extra zero column)
    y = Gather(z, map, axis=-1) + b  [..., n]       map[j] = position of j in K, else k

which equals x @ W^T + b because the dropped columns of W^T are zero (checked). It saves
(n - k) / n of the MatMul but adds a Gather over the full output, so it only pays when few rows
are kept. ``mode`` decides per matrix: ``dense`` never scatters, ``scatter`` always does, and
``auto`` asks a :class:`ScatterCost` that times both forms of that exact shape with ONNX
Runtime on this machine (1 thread, ``tokens`` rows) and scatters only when that is clearly
faster. Every decision and its timings go in the report.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.linears import (
    LinearSite,
    StripReport,
    add_initializer,
    clear_intermediate_shapes,
    find_linears,
    linear_params,
)
from graph_passes.scatter_cost import ScatterCost
from mlpruning.core.errors import UserError
from mlpruning.core.manifest import Manifest

MODES = ("auto", "dense", "scatter")
_KEPT = {"attn_out": "attn_out_rows_kept_indices", "ffn_out": "ffn_out_rows_kept_indices"}


def _scatter(site: LinearSite, kept: np.ndarray) -> None:
    weight = site.weight.const_value.numpy()
    n = weight.shape[1]
    packed = np.concatenate([weight[:, kept], np.zeros((weight.shape[0], 1), weight.dtype)], axis=1)
    index = np.full(n, len(kept), dtype=np.int64)
    index[kept] = np.arange(len(kept))
    site.set_weight(packed)
    graph, out = site.matmul.graph, site.matmul.outputs[0]
    index_value = add_initializer(graph, f"{site.matmul.name}__scatter_index", index)
    gather = ir.Node("", "Gather", [out, index_value], attributes=[ir.AttrInt64("axis", -1)])
    gather.name = f"{site.matmul.name}__scatter"
    graph.insert_after(site.matmul, gather)
    for user, i in list(out.uses()):
        if user is not gather:
            user.replace_input_with(i, gather.outputs[0])


class ScatterRowsPass(ir.passes.InPlacePass):
    """Shrink O and FFN-out to their kept output rows where the cost says it pays."""

    def __init__(self, manifest: Manifest, mode: str = "auto", cost: ScatterCost | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"scatter mode {mode!r}: use one of {', '.join(MODES)}")
        self.manifest, self.mode = manifest, mode
        self.cost = cost or ScatterCost()
        self.report = StripReport("scatter_rows")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_linears(model, self.manifest)
        self.report.params_before = linear_params(model, self.manifest)
        for layer, info in enumerate(self.manifest["layers"]):
            for name, key in _KEPT.items():
                site = sites.get((layer, name))
                if site is not None and key in info:
                    self._site(site, np.asarray(sorted(info[key]), np.int64))
        if self.report.rewrites:
            clear_intermediate_shapes(model)
        self.report.params_after = linear_params(model, self.manifest)
        return ir.passes.PassResult(model, modified=self.report.rewrites > 0)

    def _site(self, site: LinearSite, kept: np.ndarray) -> None:
        where = f"layer {site.layer} {site.name}"
        weight = site.weight.const_value.numpy()
        n_in, n = weight.shape
        if len(kept) in (0, n):
            return  # nothing to scatter, or nothing left (strip passes handle empty layers)
        dropped = np.ones(n, dtype=bool)
        dropped[kept] = False
        if weight[:, dropped].any():
            raise UserError(
                f"pruning.json does not match model.onnx: {where} has output rows pruned in the "
                "manifest whose weights are nonzero; re-export the checkpoint"
            )
        if self.mode == "dense":
            self.report.skipped.append(
                f"{where}: {len(kept)}/{n} rows kept, left dense (--scatter-rows dense)"
            )
            return
        if self.mode == "auto":
            decision = self.cost.decide(n_in, n, len(kept))
            if not decision.scatter:
                self.report.skipped.append(f"{where}: {decision.reason}")
                return
            self.report.notes.append(f"{where}: {decision.reason}")
        _scatter(site, kept)
        self.report.rewrites += 1
