"""Strip pruned attention heads from an exported encoder.

Per layer, with kept heads K (sorted) and head size d, the kept attention columns are
c = [h*d, ..., h*d + d - 1 for h in K]. Graph weights are W transposed ([in, out]), so:

- Q, K, V:  W^T[:, c] and bias[c]  (each head is d consecutive output features);
- O:        W^T[c, :]              (O reads the concatenated heads: its input rows follow them).

The attention reshapes need no rewrite when the exporter left the head axis as -1 (transformers
5 reshapes to [batch, seq, -1, d] and back to [batch, seq, -1]); a Reshape that names the
original head count explicitly is reported as a reason to skip the layer, never silently left
wrong. A layer with no kept head is skipped with a reason (its "+ O bias" form is future work).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from graph_passes.linears import (
    LinearSite,
    StripReport,
    clear_intermediate_shapes,
    count_params,
    find_linears,
)


def _columns(heads: list[int], d: int) -> np.ndarray:
    return np.concatenate([np.arange(h * d, (h + 1) * d) for h in heads]).astype(np.int64)


def _slice_out(site: LinearSite, cols: np.ndarray) -> None:
    site.set_weight(site.weight.const_value.numpy()[:, cols].copy())
    if site.bias is not None:
        site.set_bias(site.bias.const_value.numpy()[cols].copy())


class StripHeadsPass(ir.passes.InPlacePass):
    """Slice Q/K/V output features and O input features down to the kept heads."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        super().__init__()
        self.manifest = manifest
        self.report = StripReport("strip_heads")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_linears(model, self.manifest)
        self.report.params_before = count_params(sites)
        geo = self.manifest["geometry"]
        for layer, info in enumerate(self.manifest["layers"]):
            kept = sorted(info["heads_kept"])
            needed = [sites.get((layer, n)) for n in ("query", "key", "value", "attn_out")]
            if len(kept) == geo["num_heads"]:
                continue
            if not kept:
                self.report.skipped.append(f"layer {layer}: no head kept (not supported yet)")
                continue
            if any(s is None for s in needed):
                self.report.skipped.append(f"layer {layer}: attention linears not found by name scope")
                continue
            cols = _columns(kept, geo["head_dim"])
            for site in needed[:3]:
                _slice_out(site, cols)
            o = needed[3]
            o.set_weight(o.weight.const_value.numpy()[cols, :].copy())
            self.report.rewrites += 1
        self.report.params_after = count_params(sites)
        if self.report.rewrites:
            clear_intermediate_shapes(model)
        return ir.passes.PassResult(model, modified=self.report.rewrites > 0)
