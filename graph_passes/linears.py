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
    weight_index: int
    add: ir.Node | None
    bias: ir.Value | None  # initializer, [out]
    bias_index: int

    def set_weight(self, array: Any) -> None:
        self.weight = set_input_tensor(self.matmul, self.weight_index, self.weight, array)

    def set_bias(self, array: Any) -> None:
        if self.add is not None and self.bias is not None:
            self.bias = set_input_tensor(self.add, self.bias_index, self.bias, array)


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


def _initializer_input(node: ir.Node) -> tuple[int, ir.Value | None]:
    """(index, initializer) of a node's constant input, looking through one Identity.

    Exporters deduplicate identical tensors by routing one initializer through Identity nodes
    (all-zero biases of a fresh model, for instance).
    """
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        if value.const_value is not None and value.is_initializer():
            return index, value
        producer = value.producer()
        if producer is not None and producer.op_type == "Identity":
            source = producer.inputs[0]
            if source is not None and source.const_value is not None and source.is_initializer():
                return index, source
    return -1, None


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
            w_index, weight = _initializer_input(matmul)
            add = by_name.get(f"{scope}/Add")
            b_index, bias = (
                _initializer_input(add) if add is not None and add.op_type == "Add" else (-1, None)
            )
            if weight is not None:
                sites[(layer, name)] = LinearSite(layer, name, matmul, weight, w_index, add, bias, b_index)
    return sites


def replace_tensor(value: ir.Value, array: Any) -> None:
    """Give an initializer new contents (and the matching shape)."""
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def set_input_tensor(node: ir.Node, index: int, value: ir.Value, array: Any) -> ir.Value:
    """New contents for ``node``'s initializer input ``value``, never changing it for other users.

    Exporters share one initializer among identical tensors (all-zero biases of a freshly
    initialised model, for instance); slicing it in place would resize it for every layer. A
    shared initializer is therefore copied into a new one used by ``node`` alone, wired straight
    into input ``index`` (an Identity left without users is removed by the optimize driver).
    """
    if len(value.uses()) <= 1 and node.inputs[index] is value:
        replace_tensor(value, array)
        return value
    graph = node.graph
    new = ir.Value(
        name=f"{value.name}__{node.name}",
        shape=ir.Shape(array.shape),
        type=value.type,
        const_value=ir.tensor(array, name=f"{value.name}__{node.name}"),
    )
    graph.register_initializer(new)
    node.replace_input_with(index, new)
    return new


def clear_intermediate_shapes(model: ir.Model) -> None:
    """Forget the recorded shapes of intermediate values after weights changed width.

    Exporters may record value shapes (value_info) from the unpruned model; those are derived
    facts that slicing invalidates, so they are dropped and shape inference recomputes them.
    Graph inputs, outputs and initializers keep theirs.
    """
    keep = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    for node in model.graph:
        for value in node.outputs:
            if id(value) not in keep and not value.is_initializer():
                value.shape = None


def count_params(sites: dict[tuple[int, str], LinearSite]) -> int:
    total = 0
    for site in sites.values():
        for value in (site.weight, site.bias):
            if value is not None:
                total += value.const_value.size
    return total
