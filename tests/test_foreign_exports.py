"""Models exported and pruned elsewhere: every export style comes out of optimize loadable and exact.

The fixtures (``tests/fixtures/legacy``, see its README) are real exports of tiny random models
made with transformers 4.x, sentence-transformers, optimum and both torch.onnx exporters. Each
test zeroes heads, FFN neurons or blocks in the ONNX weights, as another tool would, drops the
manifest, and runs optimize; the result must load in ONNX Runtime and match the input model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes import strip_heads
from graph_passes.detect import detect_manifest
from graph_passes.linears import const_array
from graph_passes.optimize import optimize
from graph_passes.run_check import RunCheckFailed
from tests.onnx_zeroing import copy_folder, linears, zero_ffn_rows, zero_heads

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
STYLES = sorted(p.name for p in LEGACY.iterdir() if (p / "model.onnx").is_file())
HEAD_DIM, ALL_HEADS = 8, 32
KEPT = {0: [0, 2], 1: [1, 2, 3]}  # heads each layer keeps after the zeroing below


def _pruned(model: ir.Model) -> ir.Model:
    zero_heads(model, 0, [1, 3], HEAD_DIM)
    zero_heads(model, 1, [0], HEAD_DIM)
    zero_ffn_rows(model, 0, np.arange(0, 64, 2))
    zero_ffn_rows(model, 1, np.arange(10, 40))
    return model


def _outputs(path: Path, seed: int = 7) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, (3, 21))
    mask = np.ones_like(ids)
    mask[-1, 8:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})


def _merge_width(model: ir.Model, layer: int) -> int | str:
    """The last entry of layer ``layer``'s heads-merge Reshape: a constant, or 'computed'."""
    reshape = strip_heads.merge_reshape(linears(model)[(layer, "attn_out")])
    assert reshape is not None
    kind, last = strip_heads._last_entry(reshape)
    return last if kind == "constant" else kind


def _optimize(src: Path, out: Path, **kwargs) -> dict:
    report = optimize(src, out, **{"scatter_rows": "dense", **kwargs})
    for want, got in zip(_outputs(src / "model.onnx"), _outputs(out / "model.onnx"), strict=True):
        assert np.abs(want - got).max() <= 1e-4
    return report


@pytest.mark.parametrize("style", STYLES)
def test_pruned_export_of_every_style_comes_out_loadable_exact_and_smaller(style, tmp_path):
    src = copy_folder(LEGACY / style, tmp_path / "in", _pruned(ir.load(LEGACY / style / "model.onnx")))
    original = {layer: _merge_width(ir.load(src / "model.onnx"), layer) for layer in KEPT}
    report = _optimize(src, tmp_path / "out")
    heads, rows = report["passes"][:2]
    assert report["manifest"] == "detected" and heads["rewrites"] == 2 and rows["rewrites"] == 2
    assert heads["params_after"] < heads["params_before"] and rows["params_after"] < rows["params_before"]
    assert max(report["run_check"]["max_abs_diff"].values()) <= 1e-4
    out = ir.load(tmp_path / "out" / "model.onnx")
    for layer, kept in KEPT.items():
        if original[layer] == ALL_HEADS:  # transformers 4.x / optimum style: a constant all-head size
            assert _merge_width(out, layer) == len(kept) * HEAD_DIM
        else:  # -1 or computed: follows the tensor, left as it was
            assert _merge_width(out, layer) == original[layer]
    detected = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert [layer["heads_kept"] for layer in detected["layers"]] == [KEPT[0], KEPT[1]]


def test_constant_merge_width_is_what_older_exports_write():
    """The fixtures really hold the style the issue met: the all-head size as a constant."""
    constant = [s for s in STYLES if _merge_width(ir.load(LEGACY / s / "model.onnx"), 0) == ALL_HEADS]
    assert {"st_torchscript_op14", "hf4_bert_seqcls_op14_eager", "hf4_distilbert_op17"} <= set(constant)


def test_a_merge_reshape_left_unchanged_is_caught_and_nothing_is_written(tmp_path, monkeypatch):
    style = "st_torchscript_op14"
    src = copy_folder(LEGACY / style, tmp_path / "in", _pruned(ir.load(LEGACY / style / "model.onnx")))
    monkeypatch.setattr(strip_heads, "_set_merge_width", lambda *args: False)
    with pytest.raises(RunCheckFailed, match="after strip_heads, ONNX Runtime cannot run it .*Reshape"):
        optimize(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _renamed(model: ir.Model, prefix: str) -> ir.Model:
    for node in model.graph:
        if node.name and node.name.startswith("/"):
            node.name = prefix + node.name
    return model


@pytest.mark.parametrize("opset", [15, 16, 18])
def test_other_opsets_and_a_wrapper_prefix(opset, tmp_path):
    proto = onnx.version_converter.convert_version(
        onnx.load(LEGACY / "hf4_bert_seqcls_op14_eager" / "model.onnx"), opset
    )
    model = _renamed(ir.serde.deserialize_model(proto), "/model")  # a wrapper's ``model.`` attribute
    config = json.loads((LEGACY / "hf4_bert_seqcls_op14_eager" / "config.json").read_text())
    manifest = detect_manifest(model, config)
    assert manifest["adapter"]["prefix"] == "model.bert"
    src = copy_folder(LEGACY / "hf4_bert_seqcls_op14_eager", tmp_path / "in", _pruned(model))
    report = _optimize(src, tmp_path / "out")
    assert [p["rewrites"] for p in report["passes"][:2]] == [2, 2]
    assert _merge_width(ir.load(tmp_path / "out" / "model.onnx"), 0) == 2 * HEAD_DIM


def _compute_last_entry(model: ir.Model, reshape: ir.Node) -> None:
    """Replace the merge shape's constant last entry by heads x head size read from the tensor."""
    graph, concat = model.graph, reshape.inputs[1].producer()
    shape = ir.Node("", "Shape", [reshape.inputs[0]])
    dims = [
        ir.Node("", "Gather", [shape.outputs[0], _const(graph, f"{reshape.name}_axis{a}", [a])])
        for a in (2, 3)
    ]
    width = ir.Node("", "Mul", [dims[0].outputs[0], dims[1].outputs[0]])
    for node in (shape, *dims, width):
        graph.insert_before(concat, node)
    concat.replace_input_with(len(concat.inputs) - 1, width.outputs[0])


def _const(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    from graph_passes.linears import add_initializer

    return add_initializer(graph, name, np.array(values, np.int64))


def test_a_computed_merge_width_is_left_to_follow_the_tensor(tmp_path):
    style = "hf4_bert_seqcls_op14_eager"
    model = _pruned(ir.load(LEGACY / style / "model.onnx"))
    for layer in KEPT:
        _compute_last_entry(model, strip_heads.merge_reshape(linears(model)[(layer, "attn_out")]))
    src = copy_folder(LEGACY / style, tmp_path / "in", model)
    report = _optimize(src, tmp_path / "out")
    assert report["passes"][0]["rewrites"] == 2
    assert _merge_width(ir.load(tmp_path / "out" / "model.onnx"), 0) == "computed"


def test_a_computed_head_count_is_refused_for_its_layer_with_a_reason(tmp_path):
    style = "hf4_bert_seqcls_op14_eager"
    model = _pruned(ir.load(LEGACY / style / "model.onnx"))
    query = linears(model)[(0, "query")]
    concat = strip_heads.reshape_after(query).inputs[1].producer()
    head = const_array(concat.inputs[2])
    double = ir.Node("", "Add", [_const(model.graph, "half_heads", [int(head[0]) // 2])] * 2)
    model.graph.insert_before(concat, double)
    concat.replace_input_with(2, double.outputs[0])
    src = copy_folder(LEGACY / style, tmp_path / "in", model)
    report = _optimize(src, tmp_path / "out")
    heads = report["passes"][0]
    assert heads["rewrites"] == 1  # layer 1 only
    assert heads["skipped"] == [
        "layer 0: attention Reshapes not rewritable (query: head entry of the shape Concat is computed, "
        "not constant)"
    ]


def _blocks_source(tmp_path: Path) -> Path:
    style = "hf4_distilbert_op17"
    model = _pruned(ir.load(LEGACY / style / "model.onnx"))
    site = linears(model)[(0, "ffn_in")]  # W^T [32, 64]; the odd neurons survive the row strip
    wt = site.weight.const_value.numpy().copy()
    wt[:16, :32] = wt[16:, 32:] = 0  # after the strip: [32, 32] with 2 of its 4 16x16 blocks zero
    site.set_weight(wt)
    return copy_folder(LEGACY / style, tmp_path / "in", model)


def test_heads_rows_and_blocks_of_a_foreign_model_together(tmp_path):
    src = _blocks_source(tmp_path)
    report = _optimize(src, tmp_path / "out", block_sparse="sparse")
    heads, rows, blocks = report["passes"][:3]
    assert heads["rewrites"] == rows["rewrites"] == 2 and blocks["rewrites"] == 1
    (found,) = [m for m in blocks["matrices"] if m["action"] == "block_sparse"]
    assert (found["layer"], found["matrix"], found["source"]) == (0, "ffn_in", "weights")
    assert found["block"] == [16, 16] and found["block_density"] == 0.5 and found["coverage"] == 1.0
    ops = [n.op_type for n in ir.load(tmp_path / "out" / "model.onnx").graph]
    assert ops.count("BlockSparseLinear") == 1


@pytest.mark.parametrize(("block", "rewrites"), [("none", 0), ("16", 1), ("32", 0)])
def test_the_block_option_skips_or_forces_the_search(tmp_path, block, rewrites):
    report = _optimize(_blocks_source(tmp_path), tmp_path / "out", block_sparse="sparse", block=block)
    blocks = report["passes"][2]
    assert blocks["rewrites"] == rewrites
    if block == "none":
        assert blocks["matrices"] == [] and blocks["skipped"] == [
            "no block masks in the manifest, and the weight search is off (--block none)"
        ]
    if block == "32":  # one 32x32 block holding nonzeros: nothing to skip at that size
        entry = next(m for m in blocks["matrices"] if (m["layer"], m["matrix"]) == (0, "ffn_in"))
        assert entry["block"] is None and entry["zeros"] == 0.5


def test_cli_check_failure_is_one_line_exit_1_and_a_broken_input_is_exit_2(tmp_path, monkeypatch, capsys):
    from mlpruning import cli

    style = "st_torchscript_op14"
    src = copy_folder(LEGACY / style, tmp_path / "in", _pruned(ir.load(LEGACY / style / "model.onnx")))
    monkeypatch.setattr(strip_heads, "_set_merge_width", lambda *args: False)
    monkeypatch.setattr("sys.argv", ["mlpruning", "optimize", str(src), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 1 and len(err) == 1 and err[0].startswith("error: optimize wrote nothing")
    assert not (tmp_path / "out").exists()

    monkeypatch.undo()
    model = ir.load(LEGACY / style / "model.onnx")
    merge = strip_heads.merge_reshape(linears(model)[(0, "attn_out")])
    concat = merge.inputs[1].producer()
    concat.replace_input_with(2, _const(model.graph, "wrong_width", [31]))  # the input itself cannot run
    broken = copy_folder(LEGACY / style, tmp_path / "broken", model)
    monkeypatch.setattr("sys.argv", ["mlpruning", "optimize", str(broken), "--out", str(tmp_path / "out2")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(err) == 1 and "the input model does not run" in err[0]
    assert not (tmp_path / "out2").exists()


def test_unstructured_zeros_are_reported_with_what_blocks_would_buy(tmp_path):
    style = "hf4_bert_op17_sdpa"
    model = _pruned(ir.load(LEGACY / style / "model.onnx"))
    site = linears(model)[(1, "key")]  # W^T [32, 32]; layer 1's head 0 is pruned, 24 columns stay
    wt = site.weight.const_value.numpy().copy()
    wt[np.random.default_rng(3).random(wt.shape) < 0.6] = 0  # unstructured, as magnitude pruning leaves
    site.set_weight(wt)
    site = linears(model)[(0, "ffn_out")]  # W^T [64, 32] -> [32, 32] after the row strip
    wt = site.weight.const_value.numpy().copy()
    wt[np.random.default_rng(4).random(wt.shape) < 0.6] = 0
    site.set_weight(wt)
    src = copy_folder(LEGACY / style, tmp_path / "in", model)
    blocks = _optimize(src, tmp_path / "out")["passes"][2]
    entry = next(m for m in blocks["matrices"] if (m["layer"], m["matrix"]) == (0, "ffn_out"))
    assert entry["block"] is None and entry["zeros"] > 0.5
    assert entry["unstructured"] == pytest.approx(entry["zeros"])
    assert entry["as_blocks"]["block"] == [32, 32] and entry["as_blocks"]["measured_speedup"] > 0
    assert entry["as_blocks"]["block_density"] == pytest.approx(round((1 - entry["zeros"]) * 20) / 20)
    assert any("layer 0 ffn_out: " in n and "(unstructured)" in n for n in blocks["notes"])
    key = next(m for m in blocks["matrices"] if (m["layer"], m["matrix"]) == (1, "key"))
    assert "as_blocks" not in key  # [32, 24] after the head strip: no 32x32 or 16x16 grid to time
