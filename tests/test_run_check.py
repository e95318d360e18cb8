"""The run check optimize applies to every rewrite: inputs from the session, the polygraphy rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graph_passes.ort_fusion import session
from graph_passes.run_check import Limits, Reference, RunCheckFailed, compare, feeds, limits_of
from tests.onnx_zeroing import linears

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def test_compare_follows_the_polygraphy_rule():
    want = np.array([1.0, 100.0, -3.0], np.float32)
    assert compare(want, want + np.float32(5e-5))[1] == 0  # under atol
    assert compare(want, want * np.float32(1 + 5e-4))[1] == 0  # over atol on 100, under rtol
    diff, failing = compare(want, want + np.float32(0.5))
    assert failing == 3 and diff == pytest.approx(0.5)
    assert compare(want, np.array([1.0, np.nan, -3.0], np.float32))[1] == 1  # NaN never passes
    assert compare(np.array([1, 2]), np.array([1, 3]))[1] == 1  # integer outputs must be equal
    with pytest.raises(RunCheckFailed, match=r"output shape \[2\], the input model gives \[3\]"):
        compare(want, want[:2])


def test_a_changed_weight_fails_naming_the_output(tmp_path):
    path = LEGACY / "hf4_bert_seqcls_op14_eager" / "model.onnx"
    model = ir.load(path)
    assert limits_of(model, None) == Limits(100, 512)  # vocab read from the word-embedding Gather
    reference = Reference.of(path, limits_of(model, {"max_position_embeddings": 64}))
    assert reference.check(path)["max_abs_diff"] == {"logits": 0.0}
    site = linears(model)[(1, "ffn_in")]
    site.set_weight(site.weight.const_value.numpy() + 0.5)
    changed = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(RunCheckFailed, match="output 'logits' differs from the input model on a"):
        reference.check(changed)
    with pytest.raises(RunCheckFailed, match="ONNX Runtime cannot run it"):
        reference.check(b"not a model")


def test_feeds_follow_the_declared_inputs():
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, 12])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, [1, 12])
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["c"], to=TensorProto.INT64),
            helper.make_node("Add", ["c", "c"], ["y"]),
        ],
        "g",
        [ids, mask],
        [out],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    batches = feeds(session(model), Limits(vocab=5, positions=9))
    for feed in batches:
        assert feed["input_ids"].dtype == np.int32 and feed["input_ids"].shape == (1, 12)  # fixed axes win
        assert feed["input_ids"].max() < 5
        assert feed["attention_mask"].shape[1] <= 9 and feed["attention_mask"][-1, -1] == 0  # right-padded
