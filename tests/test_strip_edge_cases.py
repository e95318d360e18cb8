"""Strip passes on awkward masks: empty layers, pruned output rows, no manifest, dynamo graphs.

One tiny BERT (3 layers, 8 heads of 8, FFN 128) with hand-picked masks: layer 0 keeps 3 heads,
layer 1 none, layer 2 all heads but no FFN row; half of O's and FFN-out's output rows pruned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from deploy.random_parity import random_parity
from graph_passes.detect import detect_manifest
from graph_passes.linears import find_linears
from graph_passes.optimize import optimize
from graph_passes.scatter_cost import Decision, ScatterCost
from graph_passes.scopes import module_path
from mlpruning.core.errors import UserError
from pipeline.export import export_onnx
from pipeline.pruning.checkpoint import load_masked
from tests.test_strip_passes import _explicit_head_counts


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.adapters import geometry
    from pipeline.pruning.fixed import random_masks, write_masked

    root = tmp_path_factory.mktemp("awkward")
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=8,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    model = BertForSequenceClassification(cfg).eval()
    masks = random_masks(geometry(model), [3, 0, 8], 0.4, seed=1, out_rows_share=0.5)
    masks["layer2_ffn_in"][:] = False
    write_masked(model, masks, root / "masked", "sst2")
    export_onnx(root / "masked", root / "onnx")
    return root


def _max_diff(root: Path, opt: Path) -> float:
    return random_parity(root / "masked", opt / "model.onnx")


def _module_ops(path: Path, fragment: str) -> list[str]:
    return [n.op_type for n in ir.load(path).graph if fragment in (module_path(n) or "")]


def test_empty_layers_collapse_to_bias_and_heads_become_explicit(awkward, tmp_path):
    report = optimize(awkward / "onnx", tmp_path / "opt", scatter_rows="dense")
    heads, rows, blocks, scatter = report["passes"]
    assert blocks["rewrites"] == 0  # the zero output rows form no block: reported, left dense
    found = {(m["source"], m["action"], m["block"]) for m in blocks["matrices"]}
    assert found == {("weights", "dense", None)}
    assert "layer 0 attn_out: 50% zeros, no candidate block divides the weight" in blocks["skipped"]
    assert heads["notes"] == ["layer 1: no head kept, attention replaced by + O bias"]
    assert rows["notes"] == ["layer 2: no FFN row kept, FFN replaced by + FFN-out bias"]
    assert scatter["rewrites"] == 0 and len(scatter["skipped"]) == 4  # O of layers 0, 2; FFN-out of 0, 1
    model_path = tmp_path / "opt" / "model.onnx"
    assert "MatMul" not in _module_ops(model_path, "layer.1.attention")
    assert not _module_ops(model_path, "layer.2.intermediate") and not _module_ops(
        model_path, "layer.2.output.dense"
    )
    assert sorted(_explicit_head_counts(ir.load(model_path))) == [3] * 3 + [8] * 3
    assert _max_diff(awkward, tmp_path / "opt") <= 1e-4


def test_scattered_output_rows_are_exact_and_smaller(awkward, tmp_path):
    report = optimize(awkward / "onnx", tmp_path / "opt", scatter_rows="scatter")
    scatter = report["passes"][3]
    assert scatter["rewrites"] == 4 and scatter["params_after"] < scatter["params_before"]
    sites = find_linears(
        ir.load(tmp_path / "opt" / "model.onnx"), json.loads((awkward / "onnx" / "pruning.json").read_text())
    )
    # 3 heads x 8 inputs, 32 kept rows + the zero column; the bias is still found through the Gather
    assert tuple(sites[(0, "attn_out")].weight.shape) == (24, 33) and sites[(0, "attn_out")].bias is not None
    # each scattered matrix [in, 64] -> [in, 33] saves in * 31 weights, biases stay counted
    saved = sum(
        sites[k].weight.shape[0] * 31
        for k in ((0, "attn_out"), (0, "ffn_out"), (1, "ffn_out"), (2, "attn_out"))
    )
    assert scatter["params_before"] - scatter["params_after"] == saved
    assert _max_diff(awkward, tmp_path / "opt") <= 1e-4


class _Verdicts(ScatterCost):
    """A cost model with fixed answers (only the first matrix asked pays), free of timing noise."""

    def decide(self, n_in: int, n_out: int, kept: int) -> Decision:
        self._cache[(n_in, n_out, len(self._cache))] = None  # count the questions
        first = len(self._cache) == 1
        return Decision(first, 2.0 if first else 0.5, f"verdict {len(self._cache)}")


def test_auto_mode_follows_the_cost_model(awkward):
    from graph_passes.scatter_rows import ScatterRowsPass

    manifest = json.loads((awkward / "onnx" / "pruning.json").read_text())
    p = ScatterRowsPass(manifest, "auto", _Verdicts())
    p(ir.load(awkward / "onnx" / "model.onnx"))  # unstripped: O and FFN-out of all 3 layers
    assert p.report.rewrites == 1 and p.report.notes == ["layer 0 attn_out: verdict 1"]
    assert p.report.skipped == [
        f"layer {i} {n}: verdict {k}"
        for k, (i, n) in enumerate(
            [(0, "ffn_out"), (1, "attn_out"), (1, "ffn_out"), (2, "attn_out"), (2, "ffn_out")], start=2
        )
    ]
    decision = ScatterCost(rounds=1, iters=2).decide(64, 64, 8)  # the real timing runs
    assert decision.ratio > 0 and decision.reason.startswith("8/64 rows kept")


def test_no_manifest_detects_the_same_structure(awkward, tmp_path):
    folder = tmp_path / "nomanifest"
    shutil.copytree(awkward / "onnx", folder)
    (folder / "pruning.json").unlink()
    report = optimize(folder, tmp_path / "opt", scatter_rows="dense")
    optimize(awkward / "onnx", tmp_path / "ref", scatter_rows="dense")
    assert report["manifest"] == "detected"
    assert (tmp_path / "opt" / "model.onnx").read_bytes() == (tmp_path / "ref" / "model.onnx").read_bytes()
    detected = json.loads((tmp_path / "opt" / "pruning.json").read_text())
    written = json.loads((awkward / "onnx" / "pruning.json").read_text())
    for mine, theirs in zip(detected["layers"], written["layers"], strict=True):
        assert mine["heads_kept"] == theirs["heads_kept"]
        assert mine["ffn_rows_kept_indices"] == theirs["ffn_rows_kept_indices"]
        if theirs["heads_kept"]:  # with no head, every O row reads zeros and is detected as dead
            assert mine["attn_out_rows_kept_indices"] == theirs["attn_out_rows_kept_indices"]
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="--num-heads"):
        detect_manifest(_without_head_dim(folder), None)


def _without_head_dim(folder: Path) -> ir.Model:
    model = ir.load(folder / "model.onnx")
    for node in model.graph:  # hide the head size the exporter wrote into the Q reshape
        if node.op_type == "Reshape":
            node.replace_input_with(1, node.inputs[0])
    return model


def test_manifest_that_disagrees_with_the_weights_is_refused(awkward, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(awkward / "onnx", folder)
    manifest = json.loads((folder / "pruning.json").read_text())
    manifest["layers"][2]["heads_kept"] = [0, 1]  # layer 2 really keeps all 8
    (folder / "pruning.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="does not match model.onnx: layer 2 head 2"):
        optimize(folder, tmp_path / "opt")
    assert not (tmp_path / "opt" / "model.onnx").exists()


def test_dynamo_export_strips_like_torchscript(awkward, tmp_path):
    export_onnx(awkward / "masked", tmp_path / "dyn", exporter="dynamo")
    assert json.loads((tmp_path / "dyn" / "export.json").read_text())["exporter"] == "dynamo"
    names = {n.name for n in ir.load(tmp_path / "dyn" / "model.onnx").graph}
    assert not any(n.startswith("/bert/") for n in names)  # scopes come from metadata, not names
    manifest = json.loads((tmp_path / "dyn" / "pruning.json").read_text())
    model, _, _ = load_masked(awkward / "masked")
    hf = dict(model.named_parameters())
    sites = find_linears(ir.load(tmp_path / "dyn" / "model.onnx"), manifest)
    assert len(sites) == 18
    site = sites[(0, "query")]
    assert np.array_equal(
        site.weight.const_value.numpy(),
        hf["bert.encoder.layer.0.attention.self.query.weight"].detach().numpy().T,
    )
    dyn = optimize(tmp_path / "dyn", tmp_path / "dynopt", scatter_rows="scatter")
    ts = optimize(awkward / "onnx", tmp_path / "tsopt", scatter_rows="scatter")
    assert [p["params_after"] for p in dyn["passes"]] == [p["params_after"] for p in ts["passes"]]
    assert _max_diff(awkward, tmp_path / "dynopt") <= 1e-4


def test_ort_fusion_is_measured_and_reported(awkward, tmp_path):
    from graph_passes.ort_fusion import fuse_if_faster

    plain = onnx.load(awkward / "onnx" / "model.onnx")
    ops = [n.op_type for n in plain.graph.node]
    fuse_if_faster(plain, rounds=1, iters=1)
    assert [n.op_type for n in plain.graph.node] == ops  # compared with the unfused model, not itself
    report = optimize(awkward / "onnx", tmp_path / "opt", scatter_rows="dense", ort_fusion=True)
    fusion = report["ort_fusion"]
    assert fusion["max_abs_diff"] <= 1e-4 and fusion["speedup_median"] > 0
    assert fusion["kept"] == (fusion["speedup_median"] >= 1.05)
    assert "vs unfused" in fusion["reason"]
    assert _max_diff(awkward, tmp_path / "opt") <= 1e-4  # fused or not, the model is exact
