"""Locate the prunable linears of an exported encoder through the exporter's name scopes.

The TorchScript exporter names every node after the module that produced it: the query
projection of layer 0 of a BERT model is ``/bert/encoder/layer.0/attention/self/query/MatMul``,
followed by ``.../query/Add`` for the bias. Its weight input is an initializer holding W
transposed, shape [in, out], under an exporter-chosen name (``onnx::MatMul_N``), so weights are
found through the node, never by initializer name. The module paths come from the manifest's
adapter record (written by ``pipeline``), so this module needs neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

LINEARS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


@dataclass
class LinearSite:
    """One prunable linear in the graph: y = x @ weight (+ bias)."""

    layer: int
    name: str
    matmul: ir.Node
    weight: ir.Value  # initializer, [in, out]
    bias: ir.Value | None  # initializer, [out]


@dataclass
class StripReport:
    """What a strip pass changed: rewrites, parameters of the prunable linears, skip reasons."""

    name: str
    rewrites: int = 0
    params_before: int = 0
    params_after: int = 0
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _scope(prefix: str, layers: str, layer: int, path: str) -> str:
    return f"/{prefix}/{layers.replace('.', '/')}.{layer}/{path.replace('.', '/')}"


def _initializer_input(node: ir.Node) -> ir.Value | None:
    for value in node.inputs:
        if value is not None and value.const_value is not None and value.is_initializer():
            return value
    return None


def find_linears(model: ir.Model, manifest: dict[str, Any]) -> dict[tuple[int, str], LinearSite]:
    """Every prunable linear, keyed by (layer, name); missing ones are simply absent."""
    adapter = manifest["adapter"]
    by_name = {node.name: node for node in model.graph}
    sites: dict[tuple[int, str], LinearSite] = {}
    for layer in range(manifest["geometry"]["num_layers"]):
        for name in LINEARS:
            scope = _scope(adapter["prefix"], adapter["layers"], layer, adapter[name])
            matmul = by_name.get(f"{scope}/MatMul")
            if matmul is None or matmul.op_type != "MatMul":
                continue
            weight = _initializer_input(matmul)
            add = by_name.get(f"{scope}/Add")
            bias = _initializer_input(add) if add is not None and add.op_type == "Add" else None
            if weight is not None:
                sites[(layer, name)] = LinearSite(layer, name, matmul, weight, bias)
    return sites


def replace_tensor(value: ir.Value, array: Any) -> None:
    """Give an initializer new contents (and the matching shape)."""
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def count_params(sites: dict[tuple[int, str], LinearSite]) -> int:
    total = 0
    for site in sites.values():
        for value in (site.weight, site.bias):
            if value is not None:
                total += value.const_value.size
    return total
