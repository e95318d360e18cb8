"""Strip pruned FFN rows (intermediate neurons) from an exported encoder.

With kept intermediate neurons R (FFN-in rows, sorted) and graph weights stored as W^T:

- FFN-in:  W^T[:, R] and bias[R]   (a pruned neuron's row of W is gone, and its bias with it);
- FFN-out: W^T[R, :]               (FFN-out reads the neurons: its input rows follow them).

Exact because a pruned neuron contributes W_out[:, i] * gelu(0 + b_i) and the masked checkpoint
has W_out[:, i] = 0. The output rows of O and FFN-out (residual-stream dimensions) stay dense:
their zero rows cost a little compute, and scattering them back is future work (reported).
A layer with no kept neuron is skipped with a reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from graph_passes.linears import (
    StripReport,
    clear_intermediate_shapes,
    count_params,
    find_linears,
)


class StripRowsPass(ir.passes.InPlacePass):
    """Slice FFN-in output features and FFN-out input features down to the kept neurons."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        super().__init__()
        self.manifest = manifest
        self.report = StripReport("strip_rows")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_linears(model, self.manifest)
        self.report.params_before = count_params(sites)
        intermediate = self.manifest["geometry"]["intermediate"]
        for layer, info in enumerate(self.manifest["layers"]):
            rows = np.asarray(sorted(info["ffn_rows_kept_indices"]), dtype=np.int64)
            ffn_in, ffn_out = sites.get((layer, "ffn_in")), sites.get((layer, "ffn_out"))
            if len(rows) == intermediate:
                continue
            if len(rows) == 0:
                self.report.skipped.append(f"layer {layer}: no FFN row kept (not supported yet)")
                continue
            if ffn_in is None or ffn_out is None:
                self.report.skipped.append(f"layer {layer}: FFN linears not found by name scope")
                continue
            ffn_in.set_weight(ffn_in.weight.const_value.numpy()[:, rows].copy())
            if ffn_in.bias is not None:
                ffn_in.set_bias(ffn_in.bias.const_value.numpy()[rows].copy())
            ffn_out.set_weight(ffn_out.weight.const_value.numpy()[rows, :].copy())
            self.report.rewrites += 1
        self.report.skipped.append("O and FFN-out output rows kept dense (scatter-back not implemented)")
        self.report.params_after = count_params(sites)
        if self.report.rewrites:
            clear_intermediate_shapes(model)
        return ir.passes.PassResult(model, modified=self.report.rewrites > 0)
