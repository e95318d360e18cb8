"""Run the graph passes over an exported model folder and write the optimized folder.

The passes and their order are the registry's (:mod:`graph_passes.registry`): strip heads, strip
rows, block-sparse linears (from the manifest's block masks, or all-zero blocks found in the
weights), scatter output rows; they run through onnx_ir's ``PassManager``. The manifest is the
folder's ``pruning.json`` or, for models pruned elsewhere, one detected from the weight zeros
(:mod:`graph_passes.detect`). After every pass the model is serialized and must pass
``onnx.checker`` with full shape inference; a failure names the pass. The report (also written
as ``optimize.json``) lists, per pass, the rewrites, the parameters of the prunable linears
before and after, the reasons anything was skipped, and the measured choices.

A checker passing is not a model loading: every pass that changed the model is followed by a
run in ONNX Runtime, compared with the input model on random inputs of mixed lengths, and the
written file is run the same way before it is moved into place (:mod:`graph_passes.run_check`).
A failure is one line naming the pass, and nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.external_data
import onnx_ir.passes.common
from google.protobuf.message import DecodeError

from graph_passes.detect import DETECTED_KIND, detect_manifest
from graph_passes.ort_fusion import fuse_if_faster
from graph_passes.registry import OptimizeOptions, build_passes
from graph_passes.run_check import Reference, RunCheckFailed, limits_of
from mlpruning.core.atomic import staging_dir, write_json
from mlpruning.core.contract import (
    CONFIG_FILE,
    EXPORT_REPORT,
    MANIFEST_FILE,
    ONNX_FILE,
    OPTIMIZE_REPORT,
    TOKENIZER_FILES,
)
from mlpruning.core.errors import CheckFailed, UserError
from mlpruning.core.jsonfile import read_json
from mlpruning.core.manifest import EXPORT_FIX, read_manifest, write_manifest

REPORT_FILE = OPTIMIZE_REPORT
_CARRIED = (MANIFEST_FILE, EXPORT_REPORT, CONFIG_FILE, *TOKENIZER_FILES)


def _check(model: ir.Model, after: str) -> bytes:
    """The serialized model, after ``onnx.checker`` (full shape inference) accepted it."""
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise RuntimeError(f"model invalid after {after}: {exc}") from exc
    return proto.SerializeToString()


# how a user steps around a pass whose output failed to run (the strip passes have no switch)
_BYPASS = {
    "block_sparse": "pass --block none --block-sparse dense to leave block-pruned matrices dense",
    "scatter_rows": "pass --scatter-rows dense to leave output rows dense",
    "ort_fusion": "leave out --ort-fusion",
}


def _ran(reference: Reference, model: Path | bytes, after: str) -> dict[str, Any]:
    """``reference.check(model)``, its failure re-raised as one line naming the pass and a way round it."""
    try:
        return reference.check(model)
    except RunCheckFailed as exc:
        fix = _BYPASS.get(after, "this export style is not supported yet: please report it with its exporter")
        raise RunCheckFailed(f"optimize wrote nothing: after {after}, {exc}; {fix}") from None


class CheckedPass(ir.passes.InPlacePass):
    """A registered pass whose postcondition is the checker and, if it changed the model, a run.

    ``call`` runs the pass and drops the nodes its rewrites left without users; ``ensures``
    serializes the model through ``onnx.checker`` (full shape inference) and, when the pass
    changed anything, runs it against the input model (:class:`Reference`).
    """

    def __init__(self, name: str, inner: ir.passes.InPlacePass, reference: Reference) -> None:
        super().__init__()
        self.name, self.inner, self.reference = name, inner, reference
        self._modified = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._modified = self.inner(model).modified
        ir.passes.common.RemoveUnusedNodesPass()(model)  # Identity nodes a rewrite bypassed
        return ir.passes.PassResult(model, modified=self._modified)

    def ensures(self, model: ir.Model) -> None:
        serialized = _check(model, self.name)
        if self._modified:
            _ran(self.reference, serialized, self.name)


def _first_cause(exc: BaseException) -> BaseException:
    """The UserError or CheckFailed under onnx_ir's PassError / PostconditionError wrappers."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, UserError | CheckFailed):
            return cause
        cause = cause.__cause__
    return exc


def run_passes(model: ir.Model, passes: list[tuple[str, Any]], reference: Reference) -> None:
    """Every pass through onnx_ir's PassManager, each checked; one-line errors come out unwrapped."""
    manager = ir.passes.PassManager([CheckedPass(name, p, reference) for name, p in passes])
    try:
        manager(model)
    except (ir.passes.PassError, ir.passes.PostconditionError) as exc:
        root = _first_cause(exc)
        if root is exc:
            raise
        raise root from None


def read_folder(
    folder: Path, num_heads: int | None = None
) -> tuple[ir.Model, dict[str, Any], dict[str, Any] | None]:
    """The model (weights in memory), its manifest (``pruning.json``, else detected from zeros)
    and ``config.json`` (None when the folder has none)."""
    if not (folder / ONNX_FILE).is_file():
        raise UserError(f"{folder} has no {ONNX_FILE}: pass the output of mlpruning export")
    if (folder / REPORT_FILE).is_file():
        raise UserError(
            f"{folder} is already optimized ({REPORT_FILE}): pass the folder mlpruning export wrote"
        )
    try:
        model = ir.load(folder / ONNX_FILE)
    except (DecodeError, OSError) as exc:
        kind = exc.__class__.__name__
        raise UserError(f"{folder / ONNX_FILE} is not a readable ONNX model ({kind}): {EXPORT_FIX}") from None
    if not model.graph.inputs or not model.graph.outputs:  # an empty file parses as an empty model
        raise UserError(f"{folder / ONNX_FILE} has no graph inputs or outputs: {EXPORT_FIX}")
    # weights exported as external data (dynamo's default) come into memory: passes slice them
    model = ir.external_data.load_to_model(model)
    config = read_json(folder / CONFIG_FILE, EXPORT_FIX)
    if not (folder / MANIFEST_FILE).is_file():
        return model, detect_manifest(model, config, num_heads), config
    return model, read_manifest(folder / MANIFEST_FILE, "export"), config


def optimize(
    folder: Path, out: Path, options: OptimizeOptions | None = None, **fields: Any
) -> dict[str, Any]:
    """Run the registered passes over ``folder/model.onnx`` into ``out``; returns the report.

    ``options`` (or its fields as keywords): see :class:`OptimizeOptions`. Without
    ``pruning.json`` in ``folder`` the manifest is detected from the weight zeros (and written
    to ``out`` so later stages read the same one); ``num_heads`` helps when the folder has no
    ``config.json`` either.

    Every pass that changed the model is followed by a run in ONNX Runtime against the input
    model (:mod:`graph_passes.run_check`), and so is the written file before it is moved into
    ``out``: a model that does not load, run or match is never written.
    """
    opts = options or OptimizeOptions(**fields)
    model, manifest, config = read_folder(folder, opts.num_heads)
    reference = Reference.of(folder / ONNX_FILE, limits_of(model, config))
    passes = build_passes(manifest, opts)
    run_passes(model, passes, reference)
    report = {
        "source": str(folder),
        "manifest": manifest.get("kind", "masked"),
        "passes": [p.report.to_json() for _, p in passes],
    }
    fused = None
    if opts.ort_fusion:
        proto, report["ort_fusion"] = fuse_if_faster(ir.serde.serialize_model(model))
        fused = proto if report["ort_fusion"]["kept"] else None
    with staging_dir(out) as tmp:
        if fused is not None:
            onnx.save(fused, tmp / ONNX_FILE)
        else:
            ir.save(model, tmp / ONNX_FILE)
        # the file itself, as written, runs and matches before anything is moved into ``out``
        report["run_check"] = _ran(reference, tmp / ONNX_FILE, "ort_fusion" if fused else "saving")
        for name in _CARRIED:
            if (folder / name).is_file():
                shutil.copy(folder / name, tmp / name)
        if manifest.get("kind") == DETECTED_KIND:
            write_manifest(tmp / MANIFEST_FILE, manifest, "export")
    write_json(out / REPORT_FILE, report)
    return report
