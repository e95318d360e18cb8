"""Strip pruned attention heads from an exported encoder.

Per layer, with kept heads K (sorted) and head size d, the kept attention columns are
c = [h*d, ..., h*d + d - 1 for h in K]. Graph weights are W transposed ([in, out]), so:

- Q, K, V:  W^T[:, c] and bias[c]  (each head is d consecutive output features);
- O:        W^T[c, :]              (O reads the concatenated heads: its input rows follow them).

Dropping head h is exact when its contribution to O's output is zero: its V columns and V bias
are zero (softmax(.) @ 0 = 0) or O's input rows for it are zero. The pass checks that in the
weights and refuses a manifest that disagrees, rather than silently changing the model.

Each Q/K/V Reshape to [batch, seq, heads, d] is rewritten to the layer's own explicit head
count: the exporters build that shape with a Concat whose head entry is -1 or the original
count, and share it between Q, K and V (dynamo also between layers), so the pass gives every
Reshape a fresh Concat with a per-layer constant. Runtimes and fusions that read the head count
from the graph (ORT's attention fusion with num_heads=0) then see the true per-layer value.

The heads are merged back before O by a Reshape [batch, seq, heads, d] -> [batch, seq, all]. How
the exporter wrote its last entry depends on the modelling code: transformers 5 writes -1 (any
head count works), while transformers 4.x, optimum and DistilBERT write the all-head size as a
constant (``self.all_head_size``, ``n_heads * dim_per_head``), which must become the kept width
or the O MatMul cannot run. The pass gives each layer's merge Reshape its own shape with the
kept width (the constant may be shared across layers); a computed entry is left as it is (it
follows the tensor it reshapes), and any other constant is refused for that layer.

A layer with no kept head computes O(0) = O's bias for every token, so its whole attention
block collapses to "+ O bias": the O output is replaced by the bias constant (broadcast over
batch and sequence by the residual Add) and the unused attention nodes are removed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # RemoveUnusedNodesPass

from graph_passes.linears import (
    LinearSite,
    StripReport,
    add_initializer,
    clear_intermediate_shapes,
    const_array,
    find_linears,
    head_is_live,
    linear_params,
    replace_output_with_bias,
    reshape_after,
)
from mlpruning.core.errors import UserError
from mlpruning.core.manifest import Manifest


def _columns(heads: list[int], d: int) -> np.ndarray:
    if not heads:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(h * d, (h + 1) * d) for h in heads]).astype(np.int64)


def _check_dropped(layer: int, dropped: list[int], d: int, value: LinearSite, out: LinearSite) -> None:
    for h in dropped:
        if head_is_live(value, out, h, d):
            raise UserError(
                f"pruning.json does not match model.onnx: layer {layer} head {h} is pruned in the "
                "manifest but its value and output weights are nonzero; re-export the checkpoint"
            )


def _head_shape_reason(reshape: ir.Node | None) -> str | None:
    """Why the head axis of ``reshape``'s shape cannot be rewritten; None when it can."""
    if reshape is None:
        return "no Reshape after it"
    shape = reshape.inputs[1]
    const = const_array(shape) if shape is not None else None
    if const is not None:
        return None if const.shape == (4,) else f"constant shape of length {const.size}, not 4"
    producer = shape.producer() if shape is not None else None
    if producer is None or producer.op_type != "Concat" or len(producer.inputs) != 4:
        return "shape is neither a constant nor a 4-way Concat"
    head = producer.inputs[2]
    if head is None or const_array(head) is None or const_array(head).size != 1:
        return "head entry of the shape Concat is computed, not constant"
    return None


def merge_reshape(out: LinearSite) -> ir.Node | None:
    """The Reshape that merges the heads right before O's MatMul (through Identity), if any."""
    data = out.matmul.inputs[1 - out.weight_index]
    producer = data.producer() if data is not None else None
    while producer is not None and producer.op_type == "Identity":
        producer = producer.inputs[0].producer()
    return producer if producer is not None and producer.op_type == "Reshape" else None


def _last_entry(reshape: ir.Node) -> tuple[str, int | None]:
    """How the merge shape's last entry is given: ("constant", value) or ("computed", None)."""
    shape = reshape.inputs[1]
    const = const_array(shape) if shape is not None else None
    if const is not None:
        return "constant", int(const.reshape(-1)[-1])
    producer = shape.producer() if shape is not None else None
    if producer is not None and producer.op_type == "Concat" and producer.inputs:
        last = const_array(producer.inputs[-1])
        if last is not None and last.size == 1:
            return "constant", int(last.reshape(-1)[0])
    return "computed", None


def _merge_reason(reshape: ir.Node | None, all_head: int) -> str | None:
    """Why the merge Reshape's width cannot be set to the kept heads; None when it can or need not."""
    if reshape is None:
        return None  # no Reshape before O: nothing states the width
    kind, last = _last_entry(reshape)
    if kind == "computed" or last in (-1, all_head):
        return None
    return f"heads-merge Reshape before O ends in the constant {last}, not -1 or the all-head size {all_head}"


def _set_merge_width(reshape: ir.Node, all_head: int, width: int, tag: str) -> bool:
    """Give the merge Reshape a shape of its own ending in ``width``; False when there is none to set."""
    kind, last = _last_entry(reshape)
    if kind == "computed" or last != all_head:
        return False
    graph, shape = reshape.graph, reshape.inputs[1]
    const = const_array(shape)
    if const is not None:
        new = const.astype(np.int64).copy()
        new[-1] = width
        reshape.replace_input_with(1, add_initializer(graph, f"{tag}_shape", new))
        return True
    producer = shape.producer()
    entry = add_initializer(graph, f"{tag}_width", np.array([width], np.int64))
    inputs = [*producer.inputs[:-1], entry]
    concat = ir.Node("", "Concat", inputs, attributes=[ir.AttrInt64("axis", 0)], name=f"{tag}_shape")
    graph.insert_before(reshape, concat)
    reshape.replace_input_with(1, concat.outputs[0])
    return True


def _set_head_count(reshape: ir.Node, heads: int, tag: str) -> None:
    """Give ``reshape`` a shape of its own with ``heads`` on axis 2 (checked by the function above)."""
    graph = reshape.graph
    shape = reshape.inputs[1]
    const = const_array(shape)
    if const is not None:
        new = const.astype(np.int64).copy()
        new[2] = heads
        reshape.replace_input_with(1, add_initializer(graph, f"{tag}_shape", new))
        return
    producer = shape.producer()
    count = add_initializer(graph, f"{tag}_heads", np.array([heads], np.int64))
    inputs = [producer.inputs[0], producer.inputs[1], count, producer.inputs[3]]
    concat = ir.Node("", "Concat", inputs, attributes=[ir.AttrInt64("axis", 0)], name=f"{tag}_shape")
    graph.insert_before(reshape, concat)
    reshape.replace_input_with(1, concat.outputs[0])


class StripHeadsPass(ir.passes.InPlacePass):
    """Slice Q/K/V output features and O input features down to the kept heads."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        self.manifest = manifest
        self.report = StripReport("strip_heads")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_linears(model, self.manifest)
        self.report.params_before = linear_params(model, self.manifest)
        changed = False
        for layer, info in enumerate(self.manifest["layers"]):
            changed |= self._layer(layer, sorted(info["heads_kept"]), sites)
        if changed:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            clear_intermediate_shapes(model)
        self.report.params_after = linear_params(model, self.manifest)
        return ir.passes.PassResult(model, modified=changed)

    def _layer(self, layer: int, kept: list[int], sites: dict[tuple[int, str], LinearSite]) -> bool:
        geo = self.manifest["geometry"]
        heads, d = geo["num_heads"], geo["head_dim"]
        qkvo = [sites.get((layer, n)) for n in ("query", "key", "value", "attn_out")]
        if any(s is None for s in qkvo):
            self.report.skipped.append(f"layer {layer}: attention linears not found by name scope")
            return False
        q, k, v, o = qkvo
        _check_dropped(layer, sorted(set(range(heads)) - set(kept)), d, v, o)
        if not kept:
            replace_output_with_bias(o)
            self.report.rewrites += 1
            self.report.notes.append(f"layer {layer}: no head kept, attention replaced by + O bias")
            return True
        reshapes = {s.name: reshape_after(s) for s in (q, k, v)}
        reasons = {n: _head_shape_reason(r) for n, r in reshapes.items()}
        merge = merge_reshape(o)
        reasons["attn_out"] = _merge_reason(merge, heads * d)
        if any(reasons.values()):
            # slicing without a matching head count could mis-shape the attention: leave the layer
            why = "; ".join(f"{n}: {r}" for n, r in reasons.items() if r)
            self.report.skipped.append(f"layer {layer}: attention Reshapes not rewritable ({why})")
            return False
        for name, reshape in reshapes.items():
            _set_head_count(reshape, len(kept), f"layer{layer}_{name}_{len(kept)}heads")
        if len(kept) == heads:
            return True
        if merge is not None and _set_merge_width(merge, heads * d, len(kept) * d, f"layer{layer}_merge"):
            self.report.notes.append(
                f"layer {layer}: heads-merge Reshape width {heads * d} -> {len(kept) * d}"
            )
        cols = _columns(kept, d)
        for site in (q, k, v):
            site.set_weight(site.weight.const_value.numpy()[:, cols].copy())
            if site.bias is not None:
                site.set_bias(site.bias.const_value.numpy()[cols].copy())
        o.set_weight(o.weight.const_value.numpy()[cols, :].copy())
        self.report.rewrites += 1
        return True
