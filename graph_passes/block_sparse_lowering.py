"""Standard-op lowering of ``BlockSparseLinear``: the body of its per-node ONNX function.

Weights are in graph layout Wt [in, out] (y = x @ Wt + bias), cut into blocks of (bi, bo). Block
(i, j) covers Wt[i*bi:(i+1)*bi, j*bo:(j+1)*bo]; a block-row (the paper's row block of W) is one
output block j, and its output is

    y[:, j*bo:(j+1)*bo] = sum over kept i of  x[:, i*bi:(i+1)*bi] @ Wt_block(i, j)
                        = concat_i(x blocks) @ vstack_i(Wt blocks)            (one dense GEMM)

Block-rows that keep the same number c of blocks form a group; for a group of n block-rows the
n GEMMs have the same shape [T, c*bi] @ [c*bi, bo] and run as one batched MatMul. The packed
storage (``block_sparse.pack_blocks``) orders stored blocks group by group, so a group is one
contiguous slice of ``values`` (reshaped to [n, c*bi, bo]) and of ``indices`` (its input-block
column reshaped to [n, c], the Gather indices). Those slices read only initializers, so ORT's
constant folding turns them into ready-made weights when the session is created.

Two layouts of the same product, picked per node because the body is per node anyway:

- token-first (blocks of >= 32 inputs): X as [T, nI, bi]; Gather(axis=1) -> [T, n, c, bi] ->
  [n, T, c*bi] (ORT fuses this Transpose into the MatMul) @ [n, c*bi, bo] -> [n, T, bo];
- feature-first (narrower blocks): X^T as [nI, bi, T]; Gather(axis=0) copies whole [bi, T]
  panels -> [n, c*bi, T]; [n, bo, c*bi] @ that -> [n, bo, T]; one Transpose at the end.

Measured on this project's CPU (ORT 1.31, 1 thread, interleaved rounds, 128 and 1024 tokens,
30% and 10% blocks): with 16x16 blocks the token-first Gather moves 64-byte pieces and lost to
feature-first in every case (by 1.05-2.5x); with 32x32 token-first was ahead or within noise, except
3072x768 at 1024 tokens (feature-first ~1.15x faster). Hence ``choose_layout``: token-first from
32-wide input blocks. Group outputs are concatenated ([rows, T, bo] or [rows, bo, T]); block-rows
with no kept block take a zero block (ConstantOfShape, so the result is exactly the bias), and one
Gather puts block-rows back in output order (skipped when already in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

Layout = Literal["token_first", "feature_first"]


@dataclass(frozen=True)
class Group:
    """Block-rows with the same count of kept blocks, stored contiguously from ``start``."""

    count: int
    rows: tuple[int, ...]
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.count * len(self.rows)


def groups_from_indices(indices: np.ndarray, out_blocks: int) -> list[Group]:
    """The groups of a packed ``indices`` array [nnz, 2] of (input block, output block).

    Raises ValueError when the storage order is not the canonical one of ``pack_blocks``
    (block-rows by ascending count then index, each contiguous with ascending input blocks):
    the lowering slices groups out of the storage and would silently compute a wrong product.
    """
    counts = np.bincount(indices[:, 1], minlength=out_blocks) if len(indices) else np.zeros(out_blocks, int)
    order = [j for j in np.lexsort((np.arange(out_blocks), counts)) if counts[j] > 0]
    expect_out = np.repeat(np.asarray(order, dtype=np.int64), counts[order])
    if not np.array_equal(indices[:, 1], expect_out):
        raise ValueError("block indices are not in pack_blocks order: pack the weight with pack_blocks")
    groups: list[Group] = []
    start = 0
    for j in order:
        c = int(counts[j])
        rows = indices[start : start + c, 0]
        if np.any(np.diff(rows) <= 0):
            raise ValueError(f"block-row {j}: input blocks not strictly ascending in storage")
        if groups and groups[-1].count == c:
            last = groups[-1]
            groups[-1] = Group(c, (*last.rows, int(j)), last.start)
        else:
            groups.append(Group(c, (int(j),), start))
        start += c
    return groups


def choose_layout(block: tuple[int, int]) -> Layout:
    return "token_first" if block[0] >= 32 else "feature_first"


def _const(tape: Tape, array: np.ndarray | list[int] | int) -> ir.Value:
    arr = np.asarray(array, dtype=np.int64) if not isinstance(array, np.ndarray) else array
    return tape.op("Constant", [], {"value": ir.tensor(arr)})


@dataclass(frozen=True)
class _Spec:
    block: tuple[int, int]
    in_features: int
    out_features: int
    groups: list[Group]
    dtype: ir.DataType
    layout: Layout


def _group_operands(
    tape: Tape, spec: _Spec, g: Group, values: ir.Value, in_block: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """Gather indices [n, c] and weights of one group, as slices of the packed initializers."""
    bi, bo = spec.block
    n, c = len(g.rows), g.count
    start, stop = _const(tape, [g.start]), _const(tape, [g.stop])
    idx = tape.op("Reshape", [tape.op("Slice", [in_block, start, stop]), _const(tape, [n, c])])
    w = tape.op("Reshape", [tape.op("Slice", [values, start, stop]), _const(tape, [n, c * bi, bo])])
    if spec.layout == "feature_first":
        w = tape.op("Transpose", [w], {"perm": [0, 2, 1]})  # [n, bo, c*bi]
    return idx, w


def _products(tape: Tape, spec: _Spec, x: ir.Value, values: ir.Value, indices: ir.Value) -> list[ir.Value]:
    """One batched MatMul per group: [n, T, bo] (token-first) or [n, bo, T] (feature-first)."""
    bi, _ = spec.block
    n_in = spec.in_features // bi
    in_block = tape.op("Gather", [indices, _const(tape, 0)], {"axis": 1})  # [nnz]
    if spec.layout == "token_first":
        xb = tape.op("Reshape", [x, _const(tape, [-1, n_in, bi])])  # [T, nI, bi]
    else:
        xt = tape.op("Transpose", [tape.op("Reshape", [x, _const(tape, [-1, spec.in_features])])])
        xb = tape.op("Reshape", [xt, _const(tape, [n_in, bi, -1])])  # [nI, bi, T]
    outs = []
    for g in spec.groups:
        idx, w = _group_operands(tape, spec, g, values, in_block)
        n, width = len(g.rows), g.count * bi
        if spec.layout == "token_first":
            xg = tape.op("Gather", [xb, idx], {"axis": 1})  # [T, n, c, bi]
            xg = tape.op("Reshape", [xg, _const(tape, [0, n, width])])
            xg = tape.op("Transpose", [xg], {"perm": [1, 0, 2]})  # [n, T, c*bi]
            outs.append(tape.op("MatMul", [xg, w]))
        else:
            xg = tape.op("Gather", [xb, idx], {"axis": 0})  # [n, c, bi, T]
            xg = tape.op("Reshape", [xg, _const(tape, [n, width, -1])])
            outs.append(tape.op("MatMul", [w, xg]))
    return outs


def _zero_block(tape: Tape, spec: _Spec, like: ir.Value) -> ir.Value:
    """A zero block-row shaped like one block-row of the concatenated products."""
    bo = spec.block[1]
    zero = ir.tensor(np.zeros(1, dtype=spec.dtype.numpy()))
    if spec.layout == "token_first":  # like: [n, T, bo]
        tokens = tape.op("Shape", [like], {"start": 1, "end": 2})
        shape = tape.op("Concat", [_const(tape, [1]), tokens, _const(tape, [bo])], {"axis": 0})
    else:  # like: [n, bo, T]
        tokens = tape.op("Shape", [like], {"start": 2, "end": 3})
        shape = tape.op("Concat", [_const(tape, [1, bo]), tokens], {"axis": 0})
    return tape.op("ConstantOfShape", [shape], {"value": zero})


def _assemble(tape: Tape, spec: _Spec, outs: list[ir.Value], out_shape: ir.Value) -> ir.Value:
    """Concatenate group products, restore output-block order, reshape to [..., out]."""
    n_out = spec.out_features // spec.block[1]
    rows = [j for g in spec.groups for j in g.rows]
    if len(rows) < n_out:
        outs = [*outs, _zero_block(tape, spec, outs[0])]
    y = outs[0] if len(outs) == 1 else tape.op("Concat", outs, {"axis": 0})
    position = np.full(n_out, len(rows), dtype=np.int64)  # empty block-rows read the zero block
    position[rows] = np.arange(len(rows))
    if not np.array_equal(position, np.arange(n_out)):
        y = tape.op("Gather", [y, _const(tape, position)], {"axis": 0})
    if spec.layout == "token_first":
        y = tape.op("Transpose", [y], {"perm": [1, 0, 2]})  # [T, nO, bo]
    else:
        y = tape.op("Reshape", [y, _const(tape, [spec.out_features, -1])])
        y = tape.op("Transpose", [y])  # [T, out]
    return tape.op("Reshape", [y, out_shape])


def build_body(tape: Tape, spec: _Spec, x: ir.Value, values: ir.Value, indices: ir.Value) -> ir.Value:
    """The lowering's output (before bias): [..., out_features]."""
    lead = tape.op("Shape", [x], {"end": -1})
    out_shape = tape.op("Concat", [lead, _const(tape, [spec.out_features])], {"axis": 0})
    if not spec.groups:  # nothing kept: the product is all zeros
        zero = ir.tensor(np.zeros(1, dtype=spec.dtype.numpy()))
        return tape.op("ConstantOfShape", [out_shape], {"value": zero})
    return _assemble(tape, spec, _products(tape, spec, x, values, indices), out_shape)


def build_function(
    domain: str,
    op_type: str,
    overload: str,
    *,
    block: tuple[int, int],
    in_features: int,
    out_features: int,
    indices: np.ndarray,
    dtype: ir.DataType,
    has_bias: bool,
    opset: int,
    layout: Layout | None = None,
) -> ir.Function:
    """The per-node function ``domain.op_type`` with overload ``overload``."""
    groups = groups_from_indices(indices, out_features // block[1])
    spec = _Spec(block, in_features, out_features, groups, dtype, layout or choose_layout(block))
    inputs = [ir.Value(name=n) for n in ("X", "values", "indices", "bias")[: 4 if has_bias else 3]]
    tape = Tape()
    y = build_body(tape, spec, *inputs[:3])
    if has_bias:
        y = tape.op("Add", [y, inputs[3]])
    for k, node in enumerate(tape.nodes):  # function bodies need named values
        node.outputs[0].name = f"{node.op_type.lower()}_{k}"
    y.name = "Y"
    attributes = [
        ir.Attr("block_shape", ir.AttributeType.INTS, None),
        ir.Attr("in_features", ir.AttributeType.INT, None),
        ir.Attr("out_features", ir.AttributeType.INT, None),
    ]
    graph = ir.Graph(inputs, [y], nodes=tape.nodes, opset_imports={"": opset}, name=op_type)
    return ir.Function(domain, op_type, overload, graph=graph, attributes=attributes)
