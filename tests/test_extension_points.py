"""Toy registrations: a new runtime and a new architecture family are one definition plus one call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from deploy import runners
from graph_passes.optimize import optimize
from mlpruning.core import contract
from mlpruning.core.contract import Family
from mlpruning.core.errors import UserError
from tests.onnx_zeroing import copy_folder, zero_heads

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


class ConstantRunner:
    """A runtime that answers zeros: what a new runtime must provide, and nothing more."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get_inputs(self) -> list:
        return [type("Arg", (), {"name": "input_ids"})()]

    def get_outputs(self) -> list:
        return [type("Arg", (), {"name": "logits"})()]

    def get_providers(self) -> list[str]:
        return ["Constant"]

    def run(self, output_names, feeds):
        return [np.zeros((len(feeds["input_ids"]), 2), np.float32)]


def test_a_registered_runtime_opens_the_folders_it_claims(tmp_path, monkeypatch):
    monkeypatch.setattr(runners, "RUNTIMES", list(runners.RUNTIMES))
    runners.register(
        runners.Runtime(
            "constant",
            lambda folder, engine: (folder / "model.const").is_file(),
            lambda f, t, p: ConstantRunner(f),
        )
    )
    (tmp_path / "model.const").write_text("")
    runner = runners.open_model(tmp_path)
    assert runners.runtime_name(runner) == "Constant"
    assert runners.model_label(tmp_path, runner) == str(tmp_path)
    assert runner.run(None, {"input_ids": np.zeros((3, 5), np.int64)})[0].shape == (3, 2)
    onnx_folder = LEGACY / "hf4_bert_seqcls_op14_eager"  # a folder it does not claim: ONNX Runtime
    assert runners.runtime_name(runners.open_model(onnx_folder)) == "CPUExecutionProvider"


def test_outputs_are_fetched_by_name_else_by_position_else_refused(tmp_path):
    runner = ConstantRunner(tmp_path)  # one output, "logits"
    assert runners.outputs_to_fetch(runner, ["logits"]) == ["logits"]
    assert runners.outputs_to_fetch(runner, ["score"]) == ["logits"]  # made elsewhere: by position
    with pytest.raises(
        UserError, match=r"outputs \['logits'\], the task needs \['start', 'end'\]: export it"
    ):
        runners.outputs_to_fetch(runner, ["start", "end"])


TOY = Family(
    "toyenc",
    ("toyenc",),
    layers="blocks",
    query="mix.q",
    key="mix.k",
    value="mix.v",
    attn_out="mix.o",
    ffn_in="mlp.up",
    ffn_out="mlp.down",
)
RENAMES = {
    "/bert/encoder/layer.": "/toy/blocks.",
    "/attention/self/query/": "/mix/q/",
    "/attention/self/key/": "/mix/k/",
    "/attention/self/value/": "/mix/v/",
    "/attention/output/dense/": "/mix/o/",
    "/intermediate/dense/": "/mlp/up/",
    "/output/dense/": "/mlp/down/",
}


def test_a_registered_family_is_found_in_an_onnx_graph_and_stripped(tmp_path):
    saved = list(contract.FAMILIES)  # restored after the test
    model = ir.load(LEGACY / "hf4_bert_seqcls_op14_eager" / "model.onnx")
    for node in model.graph:
        for old, new in RENAMES.items():
            node.name = (node.name or "").replace(old, new)
    try:
        contract.register_family(TOY)
        with pytest.raises(ValueError, match="registered already"):
            contract.register_family(TOY)
        zero_heads(model, 0, [1, 3], 8)
        src = copy_folder(LEGACY / "hf4_bert_seqcls_op14_eager", tmp_path / "in", model)
        report = optimize(src, tmp_path / "out", scatter_rows="dense")
        assert report["passes"][0]["rewrites"] == 1
        assert max(report["run_check"]["max_abs_diff"].values()) <= 1e-4
    finally:
        contract.FAMILIES[:] = saved
