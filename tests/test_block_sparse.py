"""BlockSparseLinear: packing, the function body in onnxruntime, the numpy reference in onnx.reference,
replace_linear on a MatMul+Add graph, the TensorRT plugin form and the cost model.

Every numerical check compares against an independent dense computation: the weight with the
pruned blocks zeroed, x @ W + b in float64.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from graph_passes.block_cost import (
    DENSITY_TOLERANCE,
    Measurement,
    decide,
    decide_by_measuring,
    load_table,
    table_json,
)
from graph_passes.block_sparse import (
    DOMAIN,
    OP_TYPE,
    TRT_DOMAIN,
    BlockSparseLinear,
    pack_blocks,
    reference,
    replace_linear,
    to_tensorrt_plugin,
)
from graph_passes.block_sparse_lowering import groups_from_indices
from graph_passes.linears import LinearSite

RNG = np.random.default_rng(0)


def _mask(kind: str, blocks: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    n_in, n_out = blocks
    if kind == "all":
        return np.ones(blocks, dtype=bool)
    if kind == "none":
        return np.zeros(blocks, dtype=bool)
    if kind == "balanced":  # the same count in every block-row: one group
        mask = np.zeros(blocks, dtype=bool)
        for j in range(n_out):
            mask[rng.choice(n_in, size=max(1, n_in // 2), replace=False), j] = True
        return mask
    mask = rng.random(blocks) < 0.45
    if kind == "ragged":  # counts 0..n_in across block-rows, empty ones included
        for j in range(n_out):
            mask[:, j] = np.arange(n_in) < j % (n_in + 1)
        mask = mask[rng.permutation(n_in)]
    return mask


def _dense(x: np.ndarray, wt: np.ndarray, mask: np.ndarray, block: tuple[int, int], bias: np.ndarray | None):
    w = wt.astype(np.float64) * np.kron(mask, np.ones(block))
    return x.astype(np.float64) @ w + (0 if bias is None else bias)


def _linear_model(wt, bias, x_dims, *, opset=17, ir_version=8, relu=True):
    """X -> MatMul(W) [-> Add(B)] [-> Relu]; returns (onnx_ir model, hand-built LinearSite)."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm"], name="lin/MatMul")]
    inits = [numpy_helper.from_array(wt, "W")]
    last = "mm"
    if bias is not None:
        nodes.append(helper.make_node("Add", ["mm", "B"], ["lin_out"], name="lin/Add"))
        inits.append(numpy_helper.from_array(bias, "B"))
        last = "lin_out"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["Y"], name="act"))
    out_dims = [*x_dims[:-1], wt.shape[1]]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info("Y" if relu else last, TensorProto.FLOAT, out_dims)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    model = ir.serde.deserialize_model(proto)
    by_name = {n.name: n for n in model.graph}
    mm, add = by_name["lin/MatMul"], by_name.get("lin/Add")
    site = LinearSite(0, "q", mm, mm.inputs[1], 1, add, add.inputs[1] if add else None, 1)
    return model, site


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


def test_pack_blocks_stores_each_kept_block_in_group_order():
    wt = RNG.standard_normal((64, 96)).astype(np.float32)
    mask = _mask("ragged", (4, 3), RNG)
    packed = pack_blocks(wt, mask, (16, 32))
    assert len(packed.indices) == mask.sum()
    for (i, j), block in zip(packed.indices, packed.values, strict=True):
        assert mask[i, j]
        np.testing.assert_array_equal(block, wt[i * 16 : (i + 1) * 16, j * 32 : (j + 1) * 32])
    counts = [g.count for g in packed.groups]
    assert counts == sorted(set(counts)) and 0 not in counts
    assert sum(len(g.rows) for g in packed.groups) == (mask.sum(axis=0) > 0).sum()
    assert packed.density == pytest.approx(mask.mean())
    with pytest.raises(ValueError, match="pack_blocks order"):
        groups_from_indices(packed.indices[::-1].copy(), 3)


def test_reference_is_order_free_and_matches_dense():
    wt = RNG.standard_normal((64, 64)).astype(np.float32)
    mask, bias = _mask("random", (4, 4), RNG), RNG.standard_normal(64).astype(np.float32)
    packed = pack_blocks(wt, mask, (16, 16))
    x = RNG.standard_normal((3, 5, 64)).astype(np.float32)
    shuffled = RNG.permutation(len(packed.indices))
    got = reference(x, packed.values[shuffled], packed.indices[shuffled], bias, (16, 16), 64)
    np.testing.assert_allclose(got, _dense(x, wt, mask, (16, 16), bias), rtol=1e-5, atol=1e-4)


CASES = [  # in, out, block, mask kind, X dims (symbolic = dynamic), feeds
    (64, 96, (16, 16), "random", ["batch", "seq", 64], [(2, 5), (1, 17)]),
    (64, 128, (32, 32), "random", ["tokens", 64], [(7,), (1,)]),
    (64, 96, (16, 32), "ragged", ["batch", "seq", 64], [(2, 3)]),
    (96, 64, (32, 16), "balanced", ["batch", "seq", 96], [(3, 4)]),
    (64, 64, (16, 16), "all", ["batch", 9, 64], [(2, 9)]),
    (64, 64, (32, 32), "none", ["tokens", 64], [(4,)]),
]


@pytest.mark.parametrize("layout", ["token_first", "feature_first"])
@pytest.mark.parametrize(("din", "dout", "block", "kind", "x_dims", "feeds"), CASES)
def test_body_and_reference_match_dense(din, dout, block, kind, x_dims, feeds, layout):
    rng = np.random.default_rng(hash((din, dout, kind)) % 2**32)
    wt = rng.standard_normal((din, dout)).astype(np.float32)
    bias = rng.standard_normal(dout).astype(np.float32)
    mask = _mask(kind, (din // block[0], dout // block[1]), rng)
    model, site = _linear_model(wt, bias, x_dims)
    replace_linear(model, site, mask, block, layout=layout)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    numpy_op = ReferenceEvaluator(proto, new_ops=[BlockSparseLinear])
    body = ReferenceEvaluator(proto)  # one node: the body run by onnx.reference's standard ops
    for lead in feeds:
        x = rng.standard_normal((*lead, din)).astype(np.float32)
        want = np.maximum(_dense(x, wt, mask, block, bias), 0)
        for got in (_ort(proto, x), numpy_op.run(None, {"X": x})[0], body.run(None, {"X": x})[0]):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if kind == "none":
        np.testing.assert_array_equal(_ort(proto, x), np.maximum(np.broadcast_to(bias, want.shape), 0))


def test_replace_linear_structure():
    wt, bias = RNG.standard_normal((64, 96)).astype(np.float32), RNG.standard_normal(96).astype(np.float32)
    model, site = _linear_model(wt, bias, ["batch", "seq", 64])
    relu = next(n for n in model.graph if n.op_type == "Relu")
    node = replace_linear(model, site, _mask("random", (4, 6), RNG), (16, 16))
    assert [n.op_type for n in model.graph] == [OP_TYPE, "Relu"]
    assert (node.domain, node.overload) == (DOMAIN, "lin_MatMul")
    assert relu.inputs[0] is node.outputs[0] and node.outputs[0].name == "lin_out"
    assert [v.name for v in node.inputs] == ["X", "W.block_values", "W.block_indices", "B"]
    assert "W" not in model.graph.initializers  # the dense weight is gone
    assert list(node.attributes["block_shape"].value) == [16, 16]
    assert (node.attributes["in_features"].value, node.attributes["out_features"].value) == (64, 96)
    assert set(model.functions) == {(DOMAIN, OP_TYPE, "lin_MatMul")}
    assert model.opset_imports[DOMAIN] == 1 and model.ir_version >= 10


def test_two_nodes_run_their_own_overloads():
    """Two linears with different masks: fails if a runtime mixed up the per-node bodies."""
    w1, w2 = (RNG.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    m1, m2 = _mask("ragged", (4, 4), RNG), _mask("random", (4, 4), RNG)
    model, _ = _linear_model(w1, None, ["batch", "seq", 64])
    second = helper.make_node("MatMul", ["Y", "W2"], ["Z"], name="second/MatMul")
    proto = ir.serde.serialize_model(model)
    proto.graph.node.append(second)
    proto.graph.initializer.append(numpy_helper.from_array(w2, "W2"))
    proto.graph.output[0].name = "Z"
    model = ir.serde.deserialize_model(proto)
    nodes = {n.name: n for n in model.graph}
    for name, mask in (("lin/MatMul", m1), ("second/MatMul", m2)):  # bias-free sites
        site = LinearSite(0, name, nodes[name], nodes[name].inputs[1], 1, None, None, -1)
        replace_linear(model, site, mask, (16, 16))
    assert len(model.functions) == 2
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    x = RNG.standard_normal((2, 3, 64)).astype(np.float32)
    want = _dense(np.maximum(_dense(x, w1, m1, (16, 16), None), 0), w2, m2, (16, 16), None)
    np.testing.assert_allclose(_ort(proto, x), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ReferenceEvaluator(proto, new_ops=[BlockSparseLinear]).run(None, {"X": x})[0],
        want,
        rtol=1e-4,
        atol=1e-4,
    )


def test_bias_stays_when_matmul_output_is_shared():
    wt, bias = RNG.standard_normal((64, 64)).astype(np.float32), RNG.standard_normal(64).astype(np.float32)
    model, site = _linear_model(wt, bias, ["tokens", 64], relu=False)
    tap = ir.Node("", "Neg", [site.matmul.outputs[0]], name="tap")
    model.graph.append(tap)
    tap.outputs[0].name = "tap_out"
    model.graph.outputs.append(tap.outputs[0])
    mask = _mask("random", (4, 4), RNG)
    node = replace_linear(model, site, mask, (16, 16))
    assert len(node.inputs) == 3 and [n.op_type for n in model.graph] == [OP_TYPE, "Add", "Neg"]
    proto = ir.serde.serialize_model(model)
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y, neg = session.run(None, {"X": x})
    np.testing.assert_allclose(y, _dense(x, wt, mask, (16, 16), bias), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(neg, -_dense(x, wt, mask, (16, 16), None), rtol=1e-4, atol=1e-4)


def test_errors_name_the_fix():
    wt = RNG.standard_normal((64, 96)).astype(np.float32)
    model, site = _linear_model(wt, None, ["tokens", 64])
    with pytest.raises(ValueError, match="does not divide"):
        replace_linear(model, site, np.ones((2, 2), bool), (48, 48))
    with pytest.raises(ValueError, match="expected"):
        replace_linear(model, site, np.ones((4, 4), bool), (16, 16))
    model, site = _linear_model(wt, None, ["tokens", 64], opset=13)
    with pytest.raises(ValueError, match="re-export with opset"):
        replace_linear(model, site, np.ones((4, 6), bool), (16, 16))


def test_tensorrt_plugin_form_and_inlined_form():
    wt, bias = RNG.standard_normal((64, 96)).astype(np.float32), RNG.standard_normal(96).astype(np.float32)
    mask = _mask("ragged", (4, 6), RNG)
    model, site = _linear_model(wt, bias, ["batch", "seq", 64])
    replace_linear(model, site, mask, (16, 16))
    inlined = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    onnx_ir.passes.common.InlinePass()(inlined)
    proto = ir.serde.serialize_model(inlined)
    assert not proto.functions and all(n.domain == "" for n in proto.graph.node)
    x = RNG.standard_normal((2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(
        _ort(proto, x), np.maximum(_dense(x, wt, mask, (16, 16), bias), 0), rtol=1e-4, atol=1e-4
    )

    assert to_tensorrt_plugin(model, plugin_namespace="mlpruning") == 1
    node = next(n for n in model.graph if n.op_type == OP_TYPE)
    assert (node.domain, node.overload) == (TRT_DOMAIN, "")
    assert node.attributes["plugin_version"].value == "1"
    assert node.attributes["plugin_namespace"].value == "mlpruning"
    assert list(node.attributes["block_shape"].value) == [16, 16]
    assert all(v.is_initializer() for v in node.inputs[1:])
    assert node.inputs[2].const_value.dtype == ir.DataType.INT32
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), pack_blocks(wt, mask, (16, 16)).indices)
    assert not model.functions and DOMAIN not in model.opset_imports and model.opset_imports[TRT_DOMAIN] == 1
    onnx.checker.check_model(ir.serde.serialize_model(model))


TABLE = [
    Measurement(768, 3072, t, (32, 32), d, False, 1.0, 1.0 / s, s)
    for t, rows in {
        128: [(0.5, 0.95), (0.3, 1.6), (0.2, 2.2), (0.1, 3.5)],
        1024: [(0.5, 0.7), (0.3, 1.05), (0.2, 1.5), (0.1, 2.0)],
    }.items()
    for d, s in rows
] + [
    Measurement(768, 3072, 128, (16, 16), d, False, 1.0, 1.0 / s, s)
    for d, s in [(0.3, 0.9), (0.2, 1.2), (0.1, 2.4)]
]


def test_cost_model_never_picks_what_measured_slower():
    for row in TABLE:
        got = decide(
            TABLE, in_features=768, out_features=3072, tokens=row.tokens, block=row.block, density=row.density
        )
        assert got.block_sparse == (row.speedup >= 1.1), got.reason
    for density, tokens, block in itertools.product(
        np.linspace(0.01, 0.9, 60), (64, 128, 300, 1024, 4096), ((32, 32), (16, 16))
    ):
        got = decide(TABLE, in_features=768, out_features=3072, tokens=tokens, block=block, density=density)
        if not got.block_sparse:
            continue
        # the measured token counts around the request, and the sparsest measurement at least as
        # dense as the request: every such point must have been faster than dense
        measured = sorted({r.tokens for r in TABLE if r.block == block})
        near = {
            max([t for t in measured if t <= tokens], default=None),
            min([t for t in measured if t >= tokens], default=None),
        }
        for t in near - {None}:
            denser = [
                r
                for r in TABLE
                if (r.block, r.tokens) == (block, t) and r.density >= density - DENSITY_TOLERANCE
            ]
            assert denser and min(denser, key=lambda r: r.density).speedup >= 1.1, got.reason


def test_cost_model_reasons():
    pick = decide(TABLE, in_features=768, out_features=3072, tokens=128, block=(32, 32), density=0.2)
    assert pick.block_sparse and pick.choice == "block_sparse"
    assert pick.reason.startswith(
        "block-sparse: predicted 2.2x faster than dense at 20% blocks, 32x32, 128 tokens"
    )
    between = decide(TABLE, in_features=768, out_features=3072, tokens=128, block=(32, 32), density=0.15)
    assert between.bound == pytest.approx(2.2) and 2.2 < between.speedup < 3.5
    slower = decide(TABLE, in_features=768, out_features=3072, tokens=1024, block=(32, 32), density=0.4)
    assert not slower.block_sparse and "0.70x" in slower.reason
    assert (
        "no calibration for 8x8"
        in decide(TABLE, in_features=768, out_features=3072, tokens=128, block=(8, 8), density=0.1).reason
    )
    assert (
        "denser than any"
        in decide(TABLE, in_features=768, out_features=3072, tokens=128, block=(16, 16), density=0.4).reason
    )
    mid = decide(TABLE, in_features=768, out_features=3072, tokens=512, block=(32, 32), density=0.3)
    assert not mid.block_sparse and mid.bound == pytest.approx(1.05)  # the 1024-token bound decides
    other = decide(TABLE, in_features=3072, out_features=768, tokens=128, block=(32, 32), density=0.1)
    assert other.block_sparse and "nearest measured" in other.reason
    balanced_only = [Measurement(768, 3072, 128, (32, 32), 0.1, True, 1.0, 0.2, 5.0)]
    ragged = decide(
        balanced_only, in_features=768, out_features=3072, tokens=128, block=(32, 32), density=0.1
    )
    assert not ragged.block_sparse  # balanced-mask speed says nothing about a ragged mask
    assert decide(
        balanced_only,
        in_features=768,
        out_features=3072,
        tokens=128,
        block=(32, 32),
        density=0.1,
        balanced=True,
    ).block_sparse


def test_calibration_table_round_trip(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table_json(TABLE, {"onnxruntime": ort.__version__})))
    assert load_table(path) == TABLE
    path.write_text(json.dumps({"version": 0, "rows": []}))
    with pytest.raises(ValueError, match="re-run benchmarks/block_sparse_micro.py"):
        load_table(path)


def test_decide_by_measuring_runs_the_real_lowering():
    wt = RNG.standard_normal((256, 512)).astype(np.float32)
    mask = _mask("balanced", (8, 16), RNG)
    got = decide_by_measuring(wt, mask, (32, 32), 32, budget_s=0.1)
    assert got.bound is not None and got.block_sparse == (got.bound >= 1.1)
    assert "50% blocks, 32x32, 32 tokens" in got.reason and "256x512" in got.reason
