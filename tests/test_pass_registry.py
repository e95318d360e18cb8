"""A new graph pass is one class plus one registration: it runs, is reported, and is checked."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest

from graph_passes import registry
from graph_passes.linears import StripReport, find_linears
from graph_passes.optimize import optimize
from graph_passes.registry import OptimizeOptions, PassSpec
from graph_passes.run_check import RunCheckFailed
from tests.onnx_zeroing import copy_folder

FIXTURE = Path(__file__).parent / "fixtures" / "legacy" / "hf4_bert_seqcls_op14_eager"


class ToyPass(ir.passes.InPlacePass):
    """Tags the model (harmless) or, with ``break_it``, doubles one FFN-out bias (wrong)."""

    def __init__(self, manifest: dict, break_it: bool) -> None:
        super().__init__()
        self.manifest, self.break_it = manifest, break_it
        self.report = StripReport("toy")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.break_it:
            site = find_linears(model, self.manifest)[(0, "ffn_out")]
            site.set_bias(site.bias.const_value.numpy() * 2)
        else:
            model.metadata_props["toy"] = "seen"
        self.report.rewrites = 1
        return ir.passes.PassResult(model, modified=True)


@pytest.fixture
def passes(monkeypatch):
    monkeypatch.setattr(registry, "PASSES", list(registry.PASSES))  # registrations stay in this test
    return registry


@pytest.mark.parametrize("before", [None, "strip_heads"])
def test_a_registered_pass_runs_in_order_and_is_reported(passes, tmp_path, before):
    passes.register(PassSpec("toy", lambda manifest, opts: ToyPass(manifest, False)), before=before)
    src = copy_folder(FIXTURE, tmp_path / "in", ir.load(FIXTURE / "model.onnx"))
    report = optimize(src, tmp_path / "out", OptimizeOptions(scatter_rows="dense"))
    names = [p["name"] for p in report["passes"]]
    assert names.index("toy") == (0 if before else len(names) - 1) and len(names) == 5
    assert ir.load(tmp_path / "out" / "model.onnx").metadata_props["toy"] == "seen"
    with pytest.raises(ValueError, match="registered already"):
        passes.register(PassSpec("toy", lambda manifest, opts: ToyPass(manifest, False)))


def test_a_pass_that_changes_the_outputs_is_named_and_nothing_is_written(passes, tmp_path):
    passes.register(PassSpec("toy_break", lambda manifest, opts: ToyPass(manifest, True)))
    src = copy_folder(FIXTURE, tmp_path / "in", ir.load(FIXTURE / "model.onnx"))
    with pytest.raises(RunCheckFailed, match="after toy_break, output 'logits' differs from the input model"):
        optimize(src, tmp_path / "out", scatter_rows="dense")
    assert not (tmp_path / "out").exists()


def test_options_are_validated_on_construction():
    with pytest.raises(ValueError, match="scatter_rows must be one of auto, dense, scatter"):
        OptimizeOptions(scatter_rows="sometimes")
    with pytest.raises(ValueError, match="--block 0"):
        OptimizeOptions(block="0")
    with pytest.raises(ValueError, match="num_heads"):
        OptimizeOptions(num_heads=0)
