"""Locate the prunable linears of an exported encoder through the exporter's name scopes.

Each prunable ``nn.Linear`` becomes a ``MatMul`` whose weight input is an initializer holding W
transposed ([in, out]), usually followed by an ``Add`` of the bias, both attributed to the
linear's module (see :mod:`graph_passes.scopes` for how either exporter records that). Weights
are found through the nodes, never by initializer name. The module paths come from the
manifest's adapter record (written by ``pipeline``, or detected from the graph by
:mod:`graph_passes.detect`), so this module needs neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graph_passes.scopes import module_prefix, nodes_by_module
from mlpruning.core.contract import LINEARS
from mlpruning.core.manifest import Manifest

BIAS_ONLY = "__bias_only"  # name suffix of the bias a collapsed linear leaves behind


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
    notes: list[str] = field(default_factory=list)
    matrices: list[dict[str, Any]] = field(default_factory=list)  # per matrix: found, done

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


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


def _bias_add(nodes: list[ir.Node], matmul: ir.Node) -> tuple[ir.Node | None, int, ir.Value | None]:
    """The Add in the linear's module that adds an initializer to the MatMul output."""
    out = matmul.outputs[0]
    # after the scatter-rows pass the bias Add reads the Gather that scatters the MatMul output
    outs = {out} | {user.outputs[0] for user, _ in out.uses() if user.op_type == "Gather"}
    for node in nodes:
        if node.op_type == "Add" and any(v in outs for v in node.inputs):
            index, bias = _initializer_input(node)
            if bias is not None:
                return node, index, bias
    return None, -1, None


def find_linears(model: ir.Model, manifest: Manifest) -> dict[tuple[int, str], LinearSite]:
    """Every prunable linear, keyed by (layer, name); missing ones are simply absent."""
    adapter = manifest["adapter"]
    groups = nodes_by_module(model.graph)
    sites: dict[tuple[int, str], LinearSite] = {}
    for layer in range(manifest["geometry"]["num_layers"]):
        base = module_prefix(adapter["prefix"], adapter["layers"], layer)
        for name in LINEARS:
            nodes = groups.get(f"{base}.{adapter[name]}", [])
            for matmul in (n for n in nodes if n.op_type == "MatMul"):
                w_index, weight = _initializer_input(matmul)
                if weight is None or len(weight.shape) != 2:
                    continue
                add, b_index, bias = _bias_add(nodes, matmul)
                sites[(layer, name)] = LinearSite(layer, name, matmul, weight, w_index, add, bias, b_index)
                break
    return sites


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer (type and shape from ``array``) and return its value."""
    tensor = ir.tensor(array, name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


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
    new = add_initializer(node.graph, f"{value.name}__{node.name}", array)
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


def replace_output_with_bias(site: LinearSite) -> None:
    """Make every consumer of the linear's output read its bias instead (x @ 0 + b = b).

    The bias is a [out] constant that broadcasts over batch and sequence in the consumer (the
    residual Add); a linear without bias contributes zeros. The MatMul and Add are left without
    users for the optimize driver's dead-node removal.
    """
    out = (site.add or site.matmul).outputs[0]
    width = site.weight.shape[1]
    array = site.bias.const_value.numpy().copy() if site.bias is not None else None
    if array is None:
        array = np.zeros(width, dtype=site.weight.const_value.numpy().dtype)
    const = add_initializer(site.matmul.graph, f"{site.matmul.name}{BIAS_ONLY}", array)
    ir.convenience.replace_all_uses_with(out, const)


def const_array(value: ir.Value) -> np.ndarray | None:
    """The constant contents of ``value`` (initializer or Constant node output), else None."""
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def reshape_after(site: LinearSite) -> ir.Node | None:
    """The Reshape that consumes the linear's output (the split into heads), if any."""
    out = (site.add or site.matmul).outputs[0]
    for user, index in out.uses():
        if user.op_type == "Reshape" and index == 0:
            return user
    return None


def head_is_live(value: LinearSite, out: LinearSite, head: int, head_dim: int) -> bool:
    """Whether a head still contributes: its value columns or bias are nonzero and O reads it.

    A head whose V output is zero adds softmax(.) @ 0 = 0; one whose O input rows are zero is
    never read. Either way removing it is exact (the rule detection and the strip check share).
    """
    cols = slice(head * head_dim, (head + 1) * head_dim)
    v_live = value.weight.const_value.numpy()[:, cols].any() or (
        value.bias is not None and value.bias.const_value.numpy()[cols].any()
    )
    return bool(v_live and out.weight.const_value.numpy()[cols, :].any())


def count_params(sites: dict[tuple[int, str], LinearSite]) -> int:
    total = 0
    for site in sites.values():
        for value in (site.weight, site.bias):
            if value is not None:
                total += value.const_value.size
    return total


def linear_params(model: ir.Model, manifest: Manifest) -> int:
    """Weights of the prunable linears: MatMul/Add initializers plus BlockSparseLinear blocks."""
    total = count_params(find_linears(model, manifest))
    # biases left by layers collapsed to "+ bias" (replace_output_with_bias)
    total += sum(v.const_value.size for n, v in model.graph.initializers.items() if n.endswith(BIAS_ONLY))
    for node in model.graph:
        if node.op_type == "BlockSparseLinear":  # packed values and the folded bias
            for value in (node.inputs[1], *node.inputs[3:]):
                if value is not None and value.const_value is not None:
                    total += value.const_value.size
    return total
