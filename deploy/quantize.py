"""INT8 copies of a model folder, with ONNX Runtime's quantizers, chosen on this CPU by measurement.

Affine int8: a tensor x is stored as q = round(x / s) + z, read back as s (q - z). Weights are
int8 and symmetric (z = 0), one scale per tensor or per output channel (``per_channel``);
``reduce_range`` keeps weights to 7 bits, which avoids the saturating u8 x s8 products of x86
CPUs without VNNI (:mod:`deploy.cpu_features`). Only the linears (MatMul and Gemm with a
constant weight) are quantized, so every projection of the encoder, the pooler and the
classifier run as int8 products while LayerNorm, softmax and GELU stay fp32. Two modes:

- ``dynamic``: the scale of each activation is computed per batch at run time
  (DynamicQuantizeLinear + MatMulInteger); nothing to calibrate.
- ``static``: QuantizeLinear/DequantizeLinear pairs (QDQ) with activation ranges calibrated on
  ``calibration_examples`` training examples of the task (fixed seed; ``minmax``, ``entropy``
  or ``percentile``): uint8 activations, int8 weights (ORT's CPU format), and the QDQ form
  TensorRT's explicit quantization reads.

Choice: each candidate (mode x per-channel x reduce-range) is written, run on the task's dev
split and timed against the fp32 input in interleaved rounds (batch 1 x 128 tokens). The
fastest candidate whose dev metric is at most ``max_metric_drop`` below the fp32 model's and
whose predictions agree with the fp32 model's on at least ``min_agreement`` of the examples is
kept. When none is, accuracy control keeps the most accurate candidate's settings and leaves
whole groups of MatMuls in fp32: the task head first, then encoder layers, most sensitive
first (each measured alone), until the bounds hold. Last, a dynamic choice is measured once
more with its embedding tables in int8 (a third of the file's size on MiniLM, no change in
speed) and taken if it still meets the bounds. The report names what stayed fp32 and what each
step measured. BlockSparseLinear nodes are not MatMuls: they stay fp32 (their
skipped blocks already save the time int8 would), and the report counts them.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from deploy.cpu_features import cpu_features
from deploy.quantize_parts import (
    Candidate,
    QuantizeOptions,
    calibration_reader,
    check_source,
    layer_groups,
    write_candidate,
)
from mlpruning.core.atomic import staging_dir, write_json
from mlpruning.core.contract import ONNX_FILE, QUANTIZE_REPORT
from mlpruning.core.errors import CheckFailed
from pipeline.tasks import TaskSpec, load_split

CONTROL_SKIPS = ("head", "other", "embeddings", "block_sparse", "activation_products")  # not layers


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    metric: float
    agreement: float
    speedup: float
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.candidate.to_json(), **{k: v for k, v in asdict(self).items() if k != "candidate"}}


class _Scorer:
    """Writes, runs and times candidates of one source folder against its fp32 outputs."""

    def __init__(self, src: Path, task: TaskSpec, opts: QuantizeOptions, data_dir: Path | None) -> None:
        from deploy.onnx_eval import encode, open_for_eval, run_split

        self.src, self.task, self.opts = src, task, opts
        fp32 = open_for_eval(src, opts.threads)
        dev = load_split(task, "dev", data_dir)
        self.dev, self.labels = encode(fp32, dev), np.asarray(dev.labels)
        self.reference = run_split(fp32, task, self.dev, self.labels)
        self.calibration = None  # static candidates only: dynamic ones need no training split
        if any(c.mode == "static" for c in opts.candidates()):
            train = load_split(task, "train", data_dir)
            self.calibration = calibration_reader(fp32, train, opts.calibration_examples, opts.seed)
        self.groups = layer_groups(src / ONNX_FILE)
        self.tried: list[Scored] = []
        self.work = Path(tempfile.mkdtemp(prefix="mlpruning-quantize-"))  # last: nothing above leaks it

    @property
    def fp32_metric(self) -> float:
        return self.reference.metrics[self.task.main_metric]

    def score(self, candidate: Candidate) -> Scored:
        from deploy.bench import BenchConfig, bench
        from deploy.onnx_eval import open_for_eval, run_split

        folder = self.work / f"c{len(self.tried)}"
        opts = self.opts
        write_candidate(self.src, folder, candidate, self.groups, self.calibration, opts.calibrate_method)
        model = open_for_eval(folder, self.opts.threads)
        result = run_split(model, self.task, self.dev, self.labels)
        kind = self.task.kind
        atol, rtol = kind.agreement_tolerance(self.labels, 1e-4, 1e-3, int8=True)  # verify's at INT8
        agree = float(kind.agreeing(self.reference.outputs, result.outputs, atol, rtol).mean())
        metric = result.metrics[self.task.main_metric]
        timing = BenchConfig(batches=(1,), seqs=(128,), threads=opts.threads, warmup=3, rounds=7, iters=10)
        speedup = float(bench(folder, self.src, timing)["points"][0]["speedup_median"])
        ok = self.fp32_metric - metric <= opts.max_metric_drop and agree >= opts.min_agreement
        scored = Scored(candidate, metric, agree, speedup, ok)
        self.tried.append(scored)
        return scored

    def folder_of(self, scored: Scored) -> Path:
        return self.work / f"c{self.tried.index(scored)}"

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _measure(scorer: _Scorer, candidate: Candidate) -> Scored:
    """``candidate``'s score, measured once: accuracy control reaches some candidates twice."""
    known = [s for s in scorer.tried if s.candidate == candidate]
    return known[0] if known else scorer.score(candidate)


def _control(scorer: _Scorer, base: Candidate) -> None:
    """Accuracy control from ``base`` (see the module doc); stops at the first passing step."""
    groups = [g for g, nodes in scorer.groups.items() if g not in CONTROL_SKIPS and nodes]
    kept: tuple[str, ...] = ("head",) if scorer.groups.get("head") else ()
    if kept and _measure(scorer, base.keeping(kept)).passed:
        return
    alone = {g: _measure(scorer, base.keeping((*kept, g))) for g in groups}
    if any(s.passed for s in alone.values()):
        return
    # most sensitive first: the layer whose fp32 copy restores the most agreement, then metric
    for group in sorted(groups, key=lambda g: (-alone[g].agreement, -alone[g].metric)):
        kept = (*kept, group)
        if _measure(scorer, base.keeping(kept)).passed:
            return


def choose(scorer: _Scorer) -> Scored:
    """The fastest passing candidate, after accuracy control if no plain one passes, with its
    embedding tables in int8 where that still passes (:func:`_smaller`)."""
    for candidate in scorer.opts.candidates():
        scorer.score(candidate)
    if not any(s.passed for s in scorer.tried):
        best = max(scorer.tried, key=lambda s: (s.agreement, s.metric))
        _control(scorer, best.candidate)
    passing = [s for s in scorer.tried if s.passed]
    if not passing:
        raise CheckFailed(
            f"no INT8 copy of {scorer.src} keeps {scorer.task.main_metric} within "
            f"{scorer.opts.max_metric_drop:g} of fp32 ({scorer.fp32_metric:.4f}) with "
            f">= {scorer.opts.min_agreement:.0%} agreement, even with every layer fp32: "
            "loosen max_metric_drop or keep this model fp32; nothing written"
        )
    if scorer.opts.target == "tensorrt":  # CPU timing does not predict the GPU's
        return max(passing, key=lambda s: (s.agreement, s.metric))
    return _smaller(scorer, max(passing, key=lambda s: s.speedup))


def _smaller(scorer: _Scorer, chosen: Scored) -> Scored:
    """``chosen`` with int8 embedding tables if it still meets the bounds: the same speed (a
    lookup is not a product) in a far smaller file, as ONNX Runtime's one-line dynamic call
    makes it. Measured last, on the chosen settings only, so it never steers the choice."""
    if chosen.candidate.mode != "dynamic" or not scorer.groups.get("embeddings"):
        return chosen
    smaller = _measure(scorer, replace(chosen.candidate, int8_embeddings=True))
    return smaller if smaller.passed else chosen


def _runs(folder: Path, scorer: _Scorer) -> None:
    from deploy.onnx_eval import open_for_eval

    model = open_for_eval(folder, scorer.opts.threads)
    outputs = model.run_batch(scorer.dev[:4])
    if not all(np.isfinite(a).all() for row in outputs for a in row.values()):
        raise CheckFailed(f"the INT8 model of {scorer.src} gives non-finite outputs: nothing written")


def _why(scorer: _Scorer, chosen: Scored) -> str | None:
    """Why groups stayed fp32, in the report's words (None when nothing did)."""
    if not chosen.candidate.keep_fp32:
        return None
    plain = [s for s in scorer.tried if not s.candidate.keep_fp32]
    best = max(plain, key=lambda s: (s.agreement, s.metric))
    name = scorer.task.main_metric
    return (
        f"no full-INT8 candidate met the bounds (best: {best.agreement:.2%} agreement, {name} "
        f"{best.metric:.4f} vs fp32 {scorer.fp32_metric:.4f}); with {', '.join(chosen.candidate.keep_fp32)} "
        f"in fp32: {chosen.agreement:.2%}, {name} {chosen.metric:.4f} (layers measured one at a time, "
        "most sensitive kept first)"
    )


def quantize(
    src: Path, out: Path, opts: QuantizeOptions | None = None, data_dir: Path | None = None
) -> dict[str, Any]:
    """An INT8 copy of the fp32 model folder ``src`` in ``out``; returns the report (module doc)."""
    opts = opts or QuantizeOptions()
    task = check_source(src, opts.task)
    scorer = _Scorer(src, task, opts, data_dir)
    try:
        chosen = choose(scorer)
        report = {
            "source": str(src),
            "task": task.name,
            "target": opts.target,
            "chosen_by": "agreement, then metric" if opts.target == "tensorrt" else "speedup on this CPU",
            "chosen": chosen.to_json(),
            "fp32_metric": scorer.fp32_metric,
            "main_metric": task.main_metric,
            "kept_fp32": {g: scorer.groups[g] for g in chosen.candidate.keep_fp32},
            "why_fp32": _why(scorer, chosen),
            "block_sparse_fp32": scorer.groups.get("block_sparse", []),
            "candidates": [s.to_json() for s in scorer.tried],
            "options": asdict(opts),
            "cpu": cpu_features(),
            "size_bytes": {"fp32": (src / ONNX_FILE).stat().st_size},
        }
        with staging_dir(out) as tmp:
            shutil.copytree(scorer.folder_of(chosen), tmp, dirs_exist_ok=True)
            report["size_bytes"]["int8"] = (tmp / ONNX_FILE).stat().st_size
            _runs(tmp, scorer)  # the file as written loads and answers before it is moved into place
            write_json(tmp / QUANTIZE_REPORT, report)
    finally:
        scorer.close()
    return report
