"""Strip pruned FFN rows (intermediate neurons) from an exported encoder.

With kept intermediate neurons R (FFN-in rows, sorted) and graph weights stored as W^T:

- FFN-in:  W^T[:, R] and bias[R]   (a pruned neuron's row of W is gone, and its bias with it);
- FFN-out: W^T[R, :]               (FFN-out reads the neurons: its input rows follow them).

Exact because a pruned neuron contributes W_out[:, i] * act(0 + b_i) and the masked checkpoint
has W_out[:, i] = 0; the pass checks those rows are zero and refuses a manifest that disagrees.
A layer with no kept neuron computes FFN-out(act(.)) @ 0 + b, so its FFN collapses to
"+ FFN-out bias" (the FFN-in and FFN-out nodes are removed). The output rows of O and FFN-out
(residual-stream dimensions) are the business of the scatter-rows pass.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # RemoveUnusedNodesPass

from graph_passes.linears import (
    LinearSite,
    StripReport,
    clear_intermediate_shapes,
    find_linears,
    linear_params,
    replace_output_with_bias,
)
from mlpruning.core.errors import UserError
from mlpruning.core.manifest import Manifest


class StripRowsPass(ir.passes.InPlacePass):
    """Slice FFN-in output features and FFN-out input features down to the kept neurons."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        self.manifest = manifest
        self.report = StripReport("strip_rows")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_linears(model, self.manifest)
        self.report.params_before = linear_params(model, self.manifest)
        changed = False
        for layer, info in enumerate(self.manifest["layers"]):
            changed |= self._layer(layer, np.asarray(sorted(info["ffn_rows_kept_indices"]), np.int64), sites)
        if changed:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            clear_intermediate_shapes(model)
        self.report.params_after = linear_params(model, self.manifest)
        return ir.passes.PassResult(model, modified=changed)

    def _layer(self, layer: int, rows: np.ndarray, sites: dict[tuple[int, str], LinearSite]) -> bool:
        ffn_in, ffn_out = sites.get((layer, "ffn_in")), sites.get((layer, "ffn_out"))
        if len(rows) == self.manifest["geometry"]["intermediate"]:
            return False
        if ffn_in is None or ffn_out is None:
            self.report.skipped.append(f"layer {layer}: FFN linears not found by name scope")
            return False
        dropped = np.ones(ffn_out.weight.shape[0], dtype=bool)
        dropped[rows] = False
        if ffn_out.weight.const_value.numpy()[dropped].any():
            raise UserError(
                f"pruning.json does not match model.onnx: layer {layer} has FFN rows pruned in the "
                "manifest whose FFN-out weights are nonzero; re-export the checkpoint"
            )
        if len(rows) == 0:
            replace_output_with_bias(ffn_out)
            self.report.notes.append(f"layer {layer}: no FFN row kept, FFN replaced by + FFN-out bias")
        else:
            ffn_in.set_weight(ffn_in.weight.const_value.numpy()[:, rows].copy())
            if ffn_in.bias is not None:
                ffn_in.set_bias(ffn_in.bias.const_value.numpy()[rows].copy())
            ffn_out.set_weight(ffn_out.weight.const_value.numpy()[rows, :].copy())
        self.report.rewrites += 1
        return True
