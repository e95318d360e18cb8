"""A pruning manifest read from the weights themselves, for ONNX models pruned by other tools.

Without ``pruning.json`` the strip passes still know what to remove, because pruning leaves
exact zeros that make a unit's contribution vanish:

- head h of a layer is dead when its value columns and value bias are zero (its output is
  softmax(.) @ 0 = 0) or O's input rows for it are zero (its output is never read);
- FFN neuron i is dead when FFN-out's input row i (W^T[i, :]) is zero, whatever the activation;
- output feature j of O or FFN-out (a residual-stream dimension) is dead when W^T[:, j] is zero
  (its bias is still added in full).

The encoder's layout comes from the graph: the module paths the exporter recorded (see
:mod:`graph_passes.scopes`) are matched against the known families' linear paths, which gives
the base-model prefix, the layer count and the six linears per layer; widths come from the
weights. Only the head count is not in the weights: it is read from ``config.json``
(``num_attention_heads`` / ``n_heads``), else from the head size the exporter wrote into the
query Reshape, else passed by the user.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx_ir as ir

from graph_passes.linears import LinearSite, const_array, find_linears, head_is_live, reshape_after
from graph_passes.scopes import nodes_by_module
from mlpruning.core.contract import FAMILIES, LINEARS
from mlpruning.core.errors import UserError
from mlpruning.core.manifest import LayerEntry, Manifest

DETECTED_KIND = "detected"


def _layout(model: ir.Model) -> dict[str, Any]:
    """Adapter record and layer count matched from the graph's module paths."""
    modules = nodes_by_module(model.graph)
    for adapter in FAMILIES:
        pattern = re.compile(
            rf"^(?:(?P<prefix>.+)\.)?{re.escape(adapter.layers)}\.(?P<i>\d+)\.{re.escape(adapter.query)}$"
        )
        found = [m for m in map(pattern.match, modules) if m]
        if found:
            prefixes = {m["prefix"] or "" for m in found}
            if len(prefixes) > 1:
                raise UserError(
                    f"model.onnx holds several encoders ({sorted(prefixes)}): pass a pruning.json"
                )
            return {
                "adapter": {
                    "family": adapter.family,
                    "prefix": prefixes.pop(),
                    "layers": adapter.layers,
                    **adapter.linear_paths(),
                },
                "num_layers": max(int(m["i"]) for m in found) + 1,
            }
    raise UserError(
        "model.onnx has no encoder layer this tool recognises by module names "
        "(bert, roberta, distilbert exports from torch.onnx): pass a pruning.json"
    )


def _heads_from_reshape(query: LinearSite) -> int | None:
    """Head count from the head size the exporter wrote into the query's Reshape, if it did."""
    reshape = reshape_after(query)
    shape = reshape.inputs[1] if reshape is not None else None
    producer = shape.producer() if shape is not None else None
    if producer is None or producer.op_type != "Concat" or len(producer.inputs) != 4:
        return None
    head_dim = const_array(producer.inputs[3])
    if head_dim is None or head_dim.size != 1 or int(head_dim.item()) <= 0:
        return None
    width = query.weight.shape[1]
    return width // int(head_dim.item()) if width % int(head_dim.item()) == 0 else None


def _dividing(heads: Any, width: int, what: str, fix: str) -> int:
    """``heads`` if it splits the query width into whole heads; else a UserError naming ``what``."""
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise UserError(f"{what} is not a positive whole number: {fix}")
    if width % heads:
        raise UserError(f"{what} does not divide the query width {width} of model.onnx: {fix}")
    return heads


def _head_count(config: dict[str, Any], query: LinearSite, num_heads: int | None) -> int:
    width = query.weight.shape[1]
    if num_heads is not None:
        return _dividing(num_heads, width, f"--num-heads {num_heads}", "pass the model's real head count")
    key = next((k for k in ("num_attention_heads", "n_heads") if config.get(k) is not None), None)
    if key is not None:
        what = f"config.json's {key} {config[key]!r}"
        return _dividing(config[key], width, what, "fix config.json or pass --num-heads")
    heads = _heads_from_reshape(query)
    if heads is None:
        raise UserError("cannot tell the attention head count: add config.json or pass --num-heads")
    return heads


def _nonzero(array: np.ndarray, axis: int) -> np.ndarray:
    return np.flatnonzero(np.abs(array).sum(axis=axis) > 0)


def _layer_record(sites: dict[tuple[int, str], LinearSite], layer: int, heads: int) -> LayerEntry:
    v, o = sites[(layer, "value")], sites[(layer, "attn_out")]
    ffn_out = sites[(layer, "ffn_out")]
    kept = [h for h in range(heads) if head_is_live(v, o, h, v.weight.shape[1] // heads)]
    w_out = ffn_out.weight.const_value.numpy()
    rows = _nonzero(w_out, axis=1).tolist()
    o_rows = _nonzero(o.weight.const_value.numpy(), axis=0).tolist()
    f_rows = _nonzero(w_out, axis=0).tolist()
    return {
        "heads_kept": kept,
        "num_heads_kept": len(kept),
        "ffn_rows_kept": len(rows),
        "ffn_rows_kept_indices": rows,
        "attn_out_rows_kept": len(o_rows),
        "attn_out_rows_kept_indices": o_rows,
        "ffn_out_rows_kept": len(f_rows),
        "ffn_out_rows_kept_indices": f_rows,
    }


def detect_manifest(model: ir.Model, config: dict[str, Any] | None, num_heads: int | None = None) -> Manifest:
    """A manifest equivalent to ``pruning.json``, derived from the graph and its weight zeros."""
    layout = _layout(model)
    draft = Manifest(adapter=layout["adapter"], geometry={"num_layers": layout["num_layers"]})
    sites = find_linears(model, draft)
    missing = [f"layer {i} {n}" for i in range(layout["num_layers"]) for n in LINEARS if (i, n) not in sites]
    if missing:
        raise UserError(f"model.onnx lacks prunable linears ({', '.join(missing[:3])}): pass a pruning.json")
    query = sites[(0, "query")]
    heads = _head_count(config or {}, query, num_heads)
    geometry = {
        "num_layers": layout["num_layers"],
        "num_heads": heads,
        "head_dim": query.weight.shape[1] // heads,
        "hidden": query.weight.shape[0],
        "intermediate": sites[(0, "ffn_in")].weight.shape[1],
    }
    return Manifest(
        format_version=1,
        kind=DETECTED_KIND,
        source="weight zeros (no pruning.json)",
        geometry=geometry,
        adapter=layout["adapter"],
        layers=[_layer_record(sites, i, heads) for i in range(layout["num_layers"])],
    )
