"""Export a (masked or dense) checkpoint to ONNX, with a torch-free manifest beside it.

The model is exported at full size with its zeros in place; the graph passes (torch-free) strip
what the manifest says was pruned. Exporter: the TorchScript-based ``torch.onnx.export(...,
dynamo=False)`` by default, because it measured faster on CPU than the dynamo path
(``benchmarks/exporter_speed.py`` compares both, dense and stripped, on the same weights);
``exporter="dynamo"`` is supported too. What the strip passes rely on, pinned by tests for both:
each prunable linear is one ``MatMul`` attributed to its module (TorchScript: in the node name,
``/bert/encoder/layer.0/attention/self/query/MatMul``; dynamo: in the node's name-scope
metadata) whose weight input is an initializer holding W transposed ([in, out], under an
exporter-chosen name, never the HF key), followed by an ``Add`` of the bias.

Axes: batch and sequence are dynamic for every input and the logits' batch axis. The export is
checked once on the spot: ONNX Runtime (CPU) and PyTorch must agree within 1e-4 on a fixed batch
of mixed lengths that differs from the traced one, or nothing is written.

Output folder: ``model.onnx``, ``pruning.json`` (the masked checkpoint's manifest, or a dense one
saying nothing was pruned), ``config.json`` and tokenizer files, and ``export.json`` (exporter,
opset, input/output names, parity at export, versions).
"""

from __future__ import annotations

import functools
import inspect
import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlpruning import __version__
from mlpruning.core.atomic import staging_dir, write_json
from mlpruning.core.contract import EXPORT_REPORT, ONNX_FILE
from mlpruning.core.errors import UserError
from mlpruning.core.manifest import write_manifest
from pipeline.adapters import geometry
from pipeline.evaluate import read_metadata
from pipeline.models import load_for_task, load_tokenizer, quiet_transformers
from pipeline.pruning.checkpoint import MANIFEST_FILE, build_manifest, load_masked
from pipeline.pruning.masks import mask_sizes
from pipeline.task_kind import Output
from pipeline.tasks import TaskSpec, get_task

PARITY_ATOL = 1e-4
EXPORTERS = ("torchscript", "dynamo")
_PROBE = [
    "a gripping , beautifully shot film",
    "the plot never comes together and the jokes fall flat for most of the two hours .",
    "fine",
]


class ExportMismatch(Exception):
    """The exported graph does not reproduce the PyTorch model (a failed check: exit 1)."""


def _load(ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """The model and its manifest: verified masks for a masked checkpoint, a dense manifest otherwise."""
    if (ckpt / MANIFEST_FILE).is_file():
        model, masks, manifest = load_masked(ckpt)
        # Back-fill what older manifests lack (row indices, base-model prefix) from the masks.
        fresh = build_manifest(model, masks, {})
        return model, {**manifest, **{k: fresh[k] for k in ("adapter", "geometry", "layers")}}
    task = read_metadata(ckpt).get("task")
    if task is None:
        raise UserError(f"{ckpt} is neither a masked checkpoint nor a fine-tuned one (no task recorded)")
    model = load_for_task(str(ckpt), get_task(task))
    dense = {k: torch.ones(n, dtype=torch.bool) for k, n in mask_sizes(geometry(model)).items()}
    return model, {**build_manifest(model, dense, {"task": task}), "kind": "dense"}


def _probe_batch(tokenizer: Any, names: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(_PROBE, padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in names}


@contextmanager
def _named_outputs(model: Any, task: TaskSpec) -> Iterator[Any]:
    """``model`` returning its kind's outputs as a tuple, in the kind's order (the graph's).

    The forward is swapped on the instance rather than wrapped in another module: a wrapper
    would prefix every node's scope name and every initializer, and the graph passes and
    users' tools read those names.
    """
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **inputs: Any) -> tuple[Any, ...]:
        return tuple(task.kind.tensors(original(*args, **inputs), task).values())

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward


def _dynamic_axes(output: Output) -> dict[int, str]:
    return {i: str(a) for i, a in enumerate(output.axes) if not isinstance(a, int)}


def _run_exporter(
    model: Any, task: TaskSpec, path: Path, kwargs: dict[str, Any], opset: int, exporter: str
) -> None:
    names, outputs = list(kwargs), task.kind.outputs(task)
    out_names = [o.name for o in outputs]
    with warnings.catch_warnings(), _named_outputs(model, task) as module:
        warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks
        if exporter == "torchscript":
            dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
            dynamic |= {o.name: _dynamic_axes(o) for o in outputs}
            torch.onnx.export(
                module,
                (),
                str(path),
                kwargs=kwargs,
                input_names=names,
                output_names=out_names,
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
            )
            return
        # the dynamo exporter logs one warning per missing torchvision op: not our concern
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        program = torch.onnx.export(
            module,
            (),
            kwargs=kwargs,
            input_names=names,
            output_names=out_names,
            dynamic_shapes={n: {0: batch, 1: seq} for n in names},
            opset_version=max(opset, 18),
            dynamo=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)


def _parity(model: torch.nn.Module, task: TaskSpec, path: Path, probe: dict[str, np.ndarray]) -> float:
    """The written file run once in ONNX Runtime against PyTorch: the largest output difference;
    beyond ``PARITY_ATOL`` nothing is written."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(task.kind.output_names(task), probe)
    with torch.no_grad():
        want = task.kind.tensors(model(**{k: torch.from_numpy(v) for k, v in probe.items()}), task)
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want.values(), strict=True))
    if diff > PARITY_ATOL:
        raise ExportMismatch(
            f"exported graph differs from PyTorch by {diff:.2e} (> {PARITY_ATOL}): not written"
        )
    return diff


def export_onnx(ckpt: Path, out: Path, opset: int = 17, exporter: str = "torchscript") -> dict[str, Any]:
    """Export ``ckpt`` into ``out`` (see the module docstring); returns the export report."""
    import onnxruntime as ort

    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}: use one of {', '.join(EXPORTERS)}")
    if not ckpt.is_dir():
        raise UserError(f"checkpoint folder {ckpt} does not exist: check the path")
    model, manifest = _load(ckpt)
    model, task = model.eval(), get_task(manifest["task"])
    tokenizer = load_tokenizer(str(ckpt))
    accepted = inspect.signature(model.forward).parameters
    names = [
        n
        for n in ("input_ids", "attention_mask", "token_type_ids")
        if n in tokenizer.model_input_names and n in accepted
    ]
    trace = tokenizer(
        ["export trace", "a second, longer example sentence"], padding=True, return_tensors="pt"
    )
    with staging_dir(out) as tmp, quiet_transformers():
        _run_exporter(model, task, tmp / ONNX_FILE, {n: trace[n] for n in names}, opset, exporter)
        diff = _parity(model, task, tmp / ONNX_FILE, _probe_batch(tokenizer, names))
        out_names = task.kind.output_names(task)
        report = {
            "format_version": 1,
            "exporter": exporter,
            "dynamo": exporter == "dynamo",
            "opset": opset if exporter == "torchscript" else max(opset, 18),
            "inputs": names,
            "outputs": out_names,
            "source": str(ckpt),
            "task": manifest["task"],
            "parity_max_abs_diff": diff,
            "tool_version": __version__,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        }
        write_manifest(tmp / MANIFEST_FILE, manifest, "export")
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (ckpt / "eval.json").is_file():
            shutil.copy(ckpt / "eval.json", tmp / "source_eval.json")
    write_json(out / EXPORT_REPORT, report)
    return report
