"""``BlockSparseLinear``: a block-sparse linear as a custom ONNX op that carries its own lowering.

The op (domain ``ai.mlpruning``, version 1) computes y = x @ Wt + bias for a weight Wt [in, out]
of which only some (bi, bo) blocks are kept:

- inputs: ``X`` [..., in]; ``values`` [nnz, bi, bo], the kept blocks of Wt; ``indices`` [nnz, 2]
  int64, (input block i, output block j) of each stored block, so block k is
  Wt[i*bi:(i+1)*bi, j*bo:(j+1)*bo]; optional ``bias`` [out];
- attributes: ``block_shape`` = [bi, bo], ``in_features``, ``out_features``;
- output ``Y`` [..., out]; an output block with no kept block is exactly the bias.

``values``/``indices`` fully describe the matrix, in any order, so a native kernel can claim the
op from the node alone. ``pack_blocks`` stores blocks in one canonical order (block-rows by
ascending kept count, then by j; inside a block-row by ascending i) that makes each group of
equal-count block-rows a contiguous slice: the standard-op lowering (``block_sparse_lowering``)
relies on it and checks it.

Function per node. The lowering's structure (how many groups, their sizes, the output order)
depends on the mask, so every node needs its own body. We use ONNX function overloads (IR >= 10):
every node is ``ai.mlpruning.BlockSparseLinear`` with ``overload`` naming its own model-local
function. ``onnx.checker`` (full_check) accepts it and onnxruntime 1.31 resolves the overload
(checked by running two overloads with different bodies), inlining the body unless a kernel
claims the op. The group structure lives as constants in the body; the node keeps the canonical
inputs only. Rejected: one op_type per node (a kernel could no longer claim it); one generic body,
either padding every block-row to the same count (one group, but measured earlier to break even
only at 26-46% of blocks) or looping over groups (Loop or sequence ops; not measured, and
TensorRT has no sequence ops).

TensorRT. onnx-tensorrt keys model-local functions by name only (``importLocalFunctions`` inserts
``function.name()``, ignoring domain and overload), so with several overloads it would run the
first body for every node. For TensorRT use either ``to_tensorrt_plugin`` (the node becomes a
plugin call: op_type = plugin name, string attributes ``plugin_version``/``plugin_namespace`` read
by the parser's FallbackPluginImporter, every other attribute a plugin field, weights as
initializer inputs; domain ``trt.plugins`` as ORT's TensorRT EP registers plugins), or inline the
functions first (``onnx_ir.passes.common.InlinePass``), which turns them into plain ops.

``BlockSparseLinear`` (the OpRun below) is the numpy reference for ``onnx.reference``:
``ReferenceEvaluator(model, new_ops=[BlockSparseLinear])`` runs it instead of the body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx.reference.op_run import OpRun

from graph_passes.block_sparse_lowering import Group, Layout, build_function, groups_from_indices
from graph_passes.linears import LinearSite

DOMAIN = "ai.mlpruning"
OP_TYPE = "BlockSparseLinear"
OPSET_VERSION = 1
MIN_IR_VERSION = 10  # function overloads
MIN_OPSET = 15  # Shape(start, end) in the body
TRT_DOMAIN = "trt.plugins"


@dataclass(frozen=True)
class PackedBlocks:
    """The kept blocks of one weight in canonical storage order."""

    values: np.ndarray  # [nnz, bi, bo]
    indices: np.ndarray  # [nnz, 2] int64: (input block, output block)
    block: tuple[int, int]
    in_features: int
    out_features: int

    @property
    def groups(self) -> list[Group]:
        return groups_from_indices(self.indices, self.out_features // self.block[1])

    @property
    def density(self) -> float:
        bi, bo = self.block
        return len(self.indices) * bi * bo / (self.in_features * self.out_features)


def check_block_mask(shape: tuple[int, int], mask: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``mask`` as bool, after checking it tiles a weight of ``shape`` [in, out] with ``block``."""
    bi, bo = block
    if bi <= 0 or bo <= 0 or shape[0] % bi or shape[1] % bo:
        raise ValueError(f"block {block} does not divide the weight [in, out] = {list(shape)}")
    want = (shape[0] // bi, shape[1] // bo)
    if tuple(np.shape(mask)) != want:
        raise ValueError(f"block mask has shape {np.shape(mask)}, expected {want} for {block} blocks")
    return np.asarray(mask, dtype=bool)


def pack_blocks(wt: np.ndarray, mask: np.ndarray, block: tuple[int, int]) -> PackedBlocks:
    """Kept blocks of ``wt`` [in, out] (``mask[i, j]`` keeps block (i, j)), canonically ordered."""
    mask = check_block_mask(wt.shape, mask, block)
    bi, bo = block
    counts = mask.sum(axis=0)
    rows = [j for j in np.lexsort((np.arange(mask.shape[1]), counts)) if counts[j] > 0]
    pairs = [(i, j) for j in rows for i in np.flatnonzero(mask[:, j])]
    indices = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    tiles = wt.reshape(mask.shape[0], bi, mask.shape[1], bo).transpose(0, 2, 1, 3)  # [nI, nO, bi, bo]
    values = np.ascontiguousarray(tiles[indices[:, 0], indices[:, 1]])
    return PackedBlocks(values, indices, (bi, bo), wt.shape[0], wt.shape[1])


def reference(
    x: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    bias: np.ndarray | None,
    block: tuple[int, int],
    out_features: int,
) -> np.ndarray:
    """y = x @ Wt + bias, one stored block at a time (storage order does not matter)."""
    bi, bo = block
    y = np.zeros((*x.shape[:-1], out_features), dtype=np.float64)
    for (i, j), w in zip(indices, values, strict=True):
        y[..., j * bo : (j + 1) * bo] += x[..., i * bi : (i + 1) * bi].astype(np.float64) @ w
    if bias is not None:
        y += bias
    return y.astype(x.dtype)


class BlockSparseLinear(OpRun):
    """Numpy implementation of ai.mlpruning.BlockSparseLinear for ``onnx.reference``."""

    op_domain = DOMAIN

    def _run(  # type: ignore[override]
        self,
        x: np.ndarray,
        values: np.ndarray,
        indices: np.ndarray,
        bias: np.ndarray | None = None,
        block_shape: list[int] | None = None,
        in_features: int | None = None,
        out_features: int | None = None,
    ) -> tuple[np.ndarray]:
        if block_shape is None or out_features is None or x.shape[-1] != in_features:
            raise ValueError(f"BlockSparseLinear: X [..., {x.shape[-1]}] does not match in_features")
        return (reference(x, values, indices, bias, (block_shape[0], block_shape[1]), out_features),)


def node_attributes(packed: PackedBlocks) -> list[ir.Attr]:
    return [
        ir.AttrInt64s("block_shape", list(packed.block)),
        ir.AttrInt64("in_features", packed.in_features),
        ir.AttrInt64("out_features", packed.out_features),
    ]


def add_function(
    model: ir.Model, packed: PackedBlocks, overload: str, has_bias: bool, layout: Layout | None = None
) -> ir.Function:
    """Register the node's lowering as overload ``overload``, with the opset import and IR version."""
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise ValueError(f"model opset {opset} < {MIN_OPSET}: re-export with opset >= {MIN_OPSET}")
    function = build_function(
        DOMAIN,
        OP_TYPE,
        overload,
        block=packed.block,
        in_features=packed.in_features,
        out_features=packed.out_features,
        indices=packed.indices,
        dtype=ir.DataType.from_numpy(packed.values.dtype),
        has_bias=has_bias,
        opset=opset,
        layout=layout,
    )
    model.functions[function.identifier()] = function
    model.opset_imports[DOMAIN] = OPSET_VERSION
    model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)
    return function


def _unique(existing: set[str], base: str) -> str:
    name, k = base, 1
    while name in existing:
        name, k = f"{base}_{k}", k + 1
    return name


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = _unique(set(graph.initializers), base)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer (and an Identity in front of it) nothing reads any more."""
    if value is None or value.uses() or value in graph.outputs:
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Identity":
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        _drop_if_unused(graph, source)
    elif value.is_initializer() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def _fold_bias(site: LinearSite) -> bool:
    """Whether the bias Add can go into the node: it reads only the MatMul output and the bias."""
    if site.add is None or site.bias is None:
        return False
    out = site.matmul.outputs[0]
    return len(out.uses()) == 1 and out in site.add.inputs and out not in site.matmul.graph.outputs


def _overload_name(model: ir.Model, site: LinearSite) -> str:
    base = re.sub(r"[^0-9A-Za-z_]+", "_", site.matmul.name or f"{site.layer}_{site.name}").strip("_")
    taken = {overload for domain, name, overload in model.functions if (domain, name) == (DOMAIN, OP_TYPE)}
    return _unique(taken, base or "linear")


def replace_linear(
    model: ir.Model,
    site: LinearSite,
    mask: np.ndarray,
    block: tuple[int, int],
    *,
    layout: Layout | None = None,
) -> ir.Node:
    """Rewrite ``site`` (MatMul, and its bias Add where it can be folded) into BlockSparseLinear.

    ``mask`` is in graph layout, [in / bi, out / bo] for ``block`` = (bi, bo): the transpose of a
    torch-layout [out / b_out, in / b_in] block mask. Weights outside kept blocks are dropped
    (a masked checkpoint has them zero). The new node produces the very value the old output
    had (same name; graph outputs and consumers follow), so nothing downstream changes. The
    dense weight initializer is removed once nothing reads it. Returns the new node.
    """
    if site.weight_index != 1:
        raise ValueError(f"{site.matmul.name}: weight is MatMul input {site.weight_index}, expected x @ W")
    graph = site.matmul.graph
    packed = pack_blocks(site.weight.const_value.numpy(), mask, block)
    fold = _fold_bias(site)
    overload = _overload_name(model, site)
    add_function(model, packed, overload, fold, layout)
    base = site.weight.name or overload
    inputs = [
        site.matmul.inputs[0],
        _initializer(graph, f"{base}.block_values", packed.values),
        _initializer(graph, f"{base}.block_indices", packed.indices),
    ]
    if fold:
        inputs.append(site.bias)
    name = f"{site.matmul.name}/{OP_TYPE}"
    node = ir.Node(DOMAIN, OP_TYPE, inputs, node_attributes(packed), overload=overload, name=name)
    old_nodes = [site.matmul, site.add] if fold else [site.matmul]
    dropped = [site.matmul.inputs[1], site.add.inputs[site.bias_index] if fold else None]
    last = old_nodes[-1]
    ir.convenience.replace_nodes_and_values(
        graph, last, old_nodes, [node], [last.outputs[0]], [node.outputs[0]]
    )
    for value in dropped:
        _drop_if_unused(graph, value)
    return node


def to_tensorrt_plugin(
    model: ir.Model,
    *,
    plugin_name: str = OP_TYPE,
    plugin_version: str = "1",
    plugin_namespace: str = "",
    index_dtype: type = np.int32,
) -> int:
    """Turn every BlockSparseLinear node into a TensorRT plugin call; returns how many.

    The TensorRT ONNX parser looks an unknown op up in the plugin registry by op_type = plugin
    name plus the string attributes ``plugin_version`` and ``plugin_namespace``, and hands the
    other attributes over as plugin fields and the initializer inputs as constant tensors. The
    functions are dropped: the parser would pick the first overload for every node, so a missing
    plugin must fail loudly instead. Indices become int32 (TensorRT's index type; int64 support
    is partial).
    """
    count = 0
    for node in model.graph:
        if (node.domain, node.op_type) != (DOMAIN, OP_TYPE):
            continue
        node.domain, node.op_type, node.overload = TRT_DOMAIN, plugin_name, ""
        node.attributes["plugin_version"] = ir.AttrString("plugin_version", plugin_version)
        node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", plugin_namespace)
        indices = node.inputs[2]
        array = indices.const_value.numpy().astype(index_dtype)
        node.replace_input_with(2, _initializer(model.graph, f"{indices.name}.{array.dtype}", array))
        _drop_if_unused(model.graph, indices)
        count += 1
    for key in [k for k in model.functions if k[:2] == (DOMAIN, OP_TYPE)]:
        del model.functions[key]
    if count:
        model.opset_imports[TRT_DOMAIN] = 1
    if not any(n.domain == DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph)):
        model.opset_imports.pop(DOMAIN, None)
    return count
