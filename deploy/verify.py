"""Verify ONNX artifacts against the PyTorch reference: element-wise parity and the task metric.

Parity, stage by stage (the export, then the optimized model, so a regression points at one
pass): fixed-seed batches of real dev examples of mixed lengths, right-padded, run through ONNX
Runtime (``provider``: CPU by default, or CUDA / TensorRT with onnxruntime-gpu) or, for the last
stage, a TensorRT engine (``engine``, or a folder holding only model.plan), and the masked
PyTorch model (on the CPU). Polygraphy's rule: an element fails only where it
exceeds *both* tolerances, |a - b| > atol and |a - b| > rtol * |b|. Reported: max, mean and p99
absolute difference, max relative difference, and the atol that would have passed at the given
rtol. The outputs compared are the task kind's (:mod:`pipeline.kinds`); the built-in kinds' are
per-sequence logits, so no padded position is compared.

Task metric: the whole dev set through ONNX and PyTorch. Whether a prediction agrees is the
kind's rule: the same class, or for a regression task a score within the element tolerances;
at least
``min_agreement`` of them must agree (1.0 by default: in fp32 every one), and the main metric
may fall at most ``max_metric_drop`` below PyTorch's when that bound is set. Both are printed,
with how many predictions flipped, so a lower-precision variant (an FP16 engine, INT8) can pass
on stated bounds rather than hide its flips. The whole check fails (exit 1) if any stage or the
metric check fails, naming the failed check. PyTorch is needed for the reference side only
(and the engine's buffers).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.runners import model_label, open_model, outputs_to_fetch, runtime_name
from mlpruning.core.contract import QUANTIZE_REPORT
from mlpruning.core.tolerance import EVAL_BATCH, INT8_MAX_METRIC_DROP, INT8_MIN_AGREEMENT, beyond_tolerance
from pipeline.task_kind import Outputs, stack_outputs


@dataclass(frozen=True)
class Tolerance:
    """What verify accepts: element-wise ``atol``/``rtol``, and on the whole dev set the share of
    predictions that must agree with PyTorch (``min_agreement``) and how far the main metric may
    fall below PyTorch's (``max_metric_drop``, in the metric's units: 0.01 is one point of
    accuracy). Left unset (None) they take the precision's defaults (:meth:`resolved`): every
    prediction and no bound on the metric for fp32; 99% and one point for an INT8 folder.
    """

    atol: float = 1e-4
    rtol: float = 1e-3
    min_agreement: float | None = None
    max_metric_drop: float | None = None

    def resolved(self, int8: bool) -> Tolerance:
        agreement = self.min_agreement
        if agreement is None:
            agreement = INT8_MIN_AGREEMENT if int8 else 1.0
        drop = self.max_metric_drop if self.max_metric_drop is not None or not int8 else INT8_MAX_METRIC_DROP
        return dataclasses.replace(self, min_agreement=agreement, max_metric_drop=drop)

    def __post_init__(self) -> None:
        # NaN compares False with every difference, so a NaN tolerance would pass anything
        if not all(math.isfinite(t) and t >= 0 for t in (self.atol, self.rtol)):
            raise ValueError(
                f"tolerances must be finite and >= 0, got atol={self.atol} rtol={self.rtol}: "
                "pass e.g. --atol 1e-4 --rtol 1e-3"
            )
        agreement = self.min_agreement
        if agreement is not None and not (math.isfinite(agreement) and 0 <= agreement <= 1):
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement}: e.g. 0.99")
        drop = self.max_metric_drop
        if drop is not None and not (math.isfinite(drop) and drop >= 0):
            raise ValueError(f"max_metric_drop must be finite and >= 0, got {drop}: e.g. 0.01 for one point")


def compare(got: np.ndarray, want: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    diff, failing = beyond_tolerance(got, want, tol.atol, tol.rtol)
    rel = diff / np.maximum(np.abs(want), 1e-12)
    # smallest atol that passes every element at this rtol
    needed_atol = float(np.max(np.where(diff > tol.rtol * np.abs(want), diff, 0.0)))
    # smallest rtol that passes every element at this atol
    needed_rtol = float(np.max(np.where(diff > tol.atol, rel, 0.0)))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "p99_abs": float(np.percentile(diff, 99)),
        "max_rel": float(rel.max()),
        "failing_elements": int(failing.sum()),
        "elements": int(diff.size),
        "atol_that_passes": needed_atol,
        "rtol_that_passes": needed_rtol,
        "passed": not bool(failing.any()),
    }


def open_stages(stages: list[Path], provider: str, engine: bool) -> list[tuple[str, Any]]:
    """(report label, session) per stage, in order (a folder given twice is checked twice);
    ``engine`` applies to the last stage (the folder under test)."""
    sessions = []
    for k, folder in enumerate(stages):
        session = open_model(folder, None, provider, engine and k == len(stages) - 1)
        sessions.append((model_label(folder, session), session))
    return sessions


def runtime_outputs(session: Any, names: list[str], feeds: dict[str, np.ndarray]) -> Outputs:
    """The outputs ``names`` (the task kind's) of one run: by name, or, for a model made elsewhere
    whose outputs are named otherwise but are as many, by position."""
    asked = outputs_to_fetch(session, names)
    inputs = [i.name for i in session.get_inputs()]
    return dict(zip(names, session.run(asked, {k: feeds[k] for k in inputs}), strict=True))


def _batch_outputs(session: Any, names: list[str], batch: dict[str, Any]) -> Outputs:
    return runtime_outputs(session, names, {k: v.numpy() for k, v in batch.items()})


def _flat(outputs: list[Outputs]) -> np.ndarray:
    return np.concatenate([a.ravel() for out in outputs for a in out.values()])


def _parity_batches(n_examples: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Random (not length-sorted) batches, so every batch mixes lengths and carries padding."""
    order = np.random.default_rng(seed).permutation(n_examples)[: 4 * batch_size]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _reference_model(reference: Path, task_name: str | None) -> tuple[Any, Any]:
    """The PyTorch reference (masked checkpoint or plain HF folder) in eval mode, and its task."""
    from pipeline.evaluate import task_for_checkpoint
    from pipeline.models import load_for_task
    from pipeline.pruning.checkpoint import MANIFEST_FILE, load_masked

    task = task_for_checkpoint(reference, task_name)
    masked = (reference / MANIFEST_FILE).is_file()
    model = load_masked(reference)[0] if masked else load_for_task(str(reference), task)
    return model.eval(), task


def _stage_parity(
    session: Any, model: Any, encoded: Any, task: Any, tol: Tolerance, seed: int
) -> dict[str, Any]:
    """Element-wise outputs of one ONNX stage against PyTorch on shuffled, padded dev batches."""
    import torch

    from pipeline.batching import collate

    names, got, want = task.kind.output_names(task), [], []
    for idx in _parity_batches(len(encoded), 16, seed):
        batch = collate(encoded, idx)
        with torch.no_grad():
            want.append({k: v.numpy() for k, v in task.kind.tensors(model(**batch), task).items()})
        got.append(_batch_outputs(session, names, batch))
    return compare(_flat(got), _flat(want), tol)


def _metric_parity(
    session: Any, model: Any, encoded: Any, task: Any, tol: Tolerance, int8: bool
) -> dict[str, Any]:
    """The task metric of the final stage and of PyTorch on the whole dev set, and their agreement."""
    from pipeline.batching import collate
    from pipeline.evaluate import predict

    kind, names = task.kind, task.kind.output_names(task)
    torch_out = predict(model, task, encoded)
    chunks = []
    for i in range(0, len(encoded), EVAL_BATCH):
        idx = np.arange(i, min(i + EVAL_BATCH, len(encoded)))
        chunks.append((idx, _batch_outputs(session, names, collate(encoded, idx))))
    onnx_out = stack_outputs(chunks, len(encoded))
    atol, rtol = kind.agreement_tolerance(np.asarray(encoded.labels), tol.atol, tol.rtol, int8)
    agree = int(kind.agreeing(torch_out, onnx_out, atol, rtol).sum())
    metrics = {
        "pytorch": kind.metrics(task, torch_out, encoded.labels),
        "onnx": kind.metrics(task, onnx_out, encoded.labels),
    }
    drop = metrics["pytorch"][task.main_metric] - metrics["onnx"][task.main_metric]
    checks = {
        "agreement": agree / len(encoded) >= tol.min_agreement,
        "metric_drop": tol.max_metric_drop is None or drop <= tol.max_metric_drop,
    }
    return {
        "task": task.name,
        "examples": len(encoded),
        **metrics,
        "identical_predictions": agree,
        "agreement": agree / len(encoded),
        "agreement_rule": kind.agreement_rule,
        "agreement_tolerance": {"atol": atol, "rtol": rtol},
        "min_agreement": tol.min_agreement,
        "main_metric": task.main_metric,
        "metric_drop": drop,
        "max_metric_drop": tol.max_metric_drop,
        "failed_checks": [name for name, ok in checks.items() if not ok],
        "passed": all(checks.values()),
    }


def verify(
    stages: list[Path],
    reference: Path,
    task_name: str | None,
    data_dir: Path | None,
    tol: Tolerance,
    seed: int = 0,
    provider: str = "cpu",
    engine: bool = False,
) -> dict[str, Any]:
    sessions = open_stages(stages, provider, engine)  # before the model: a wrong provider fails fast
    from pipeline.batching import encode
    from pipeline.models import load_tokenizer
    from pipeline.tasks import load_split

    int8 = [(folder / QUANTIZE_REPORT).is_file() for folder in stages]
    tol = tol.resolved(int8[-1])
    model, task = _reference_model(reference, task_name)
    encoded = encode(load_tokenizer(str(reference)), load_split(task, "dev", data_dir), 128)
    results = []
    for (stage, s), quantized in zip(sessions, int8, strict=True):
        parity = _stage_parity(s, model, encoded, task, tol, seed)
        # INT8 logits are not fp32 logits: their error is reported, agreement and metric decide
        results.append({"stage": stage, "runtime": runtime_name(s), **parity, "gating": not quantized})
    metric = _metric_parity(sessions[-1][1], model, encoded, task, tol, int8[-1])
    return {
        "reference": str(reference),
        "tolerance": tol.__dict__,
        "int8": int8[-1],
        "provider": provider,
        "stages": results,
        "metric": metric,
        "passed": all(r["passed"] or not r["gating"] for r in results) and metric["passed"],
    }


def _rule(metric: dict[str, Any]) -> str:
    rule = metric.get("agreement_rule", "same class")
    within = metric.get("agreement_tolerance")
    return (
        rule
        if "tolerance" not in rule or not within
        else f"{rule} (atol {within['atol']:.3g}, rtol {within['rtol']:.3g})"
    )


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for r in report["stages"]:
        state = "ok  " if r["passed"] else ("FAIL" if r.get("gating", True) else "info")
        lines.append(
            f"{state} {r['stage']}: max abs {r['max_abs']:.2e}, p99 {r['p99_abs']:.2e}, "
            f"max rel {r['max_rel']:.2e}; would pass with atol >= {r['atol_that_passes']:.1e} at the "
            f"given rtol, or rtol >= {r['rtol_that_passes']:.1e} at the given atol"
        )
    m = report["metric"]
    bound = "unbounded" if m["max_metric_drop"] is None else f"at most {m['max_metric_drop']:g}"
    failed = f" (failed: {', '.join(m['failed_checks'])})" if m["failed_checks"] else ""
    lines.append(
        f"{'ok  ' if m['passed'] else 'FAIL'} {m['task']} dev ({m['examples']}): pytorch {m['pytorch']} "
        f"onnx {m['onnx']}; agreement {m['identical_predictions']}/{m['examples']} "
        f"{_rule(m)} (needs >= {m['min_agreement']:.1%}), "
        f"{m['main_metric']} drop {m['metric_drop']:+.4f} ({bound}){failed}"
    )
    return lines


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
