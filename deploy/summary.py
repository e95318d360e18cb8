"""The numbers of one run folder in one file: ``summary.json``, read by the report and the gate.

Each variant the run lists (:func:`deploy.run_layout.variants`: the dense baseline, then the
pruned ones) contributes what
its stages left behind, and a stage that has not run is listed under ``missing`` instead of
failing the whole summary, so a half-finished run still gets a report:

- checkpoint (``teacher/`` for the baseline, ``step1/``, ...): the PyTorch dev metric (``eval.json``), the
  remaining-weight ratio, the per-layer structure (``structure.json``, or derived from
  ``pruning.json``) and the versions the training recorded;
- ``onnx/<v>`` and ``opt/<v>``: whether the model exists, parameters before and after the
  passes (``optimize.json``);
- ``quant/<v>/quantize.json`` (INT8 copies): the chosen settings, what stayed fp32, how many
  candidates were measured, and the CPU's INT8 features (VNNI or not) they were measured on;
- ``verify/<v>.json``: parity per stage (export, optimize) and the ONNX dev metric;
- ``bench/<v>.json``: p50/p90/p99 per batch x sequence point and the speedup vs dense, the
  median of interleaved per-round ratios (what the gate compares: ratios stay stable on a
  shared machine where absolute times drift). The baseline's latency is its own bench report
  when there is one, else the baseline side of a pruned variant's report.

The task metric is the task's main metric (accuracy, F1 for MRPC, Pearson for STS-B); the value
the gate checks is the ONNX one when verify ran (what is deployed), else the PyTorch one.
Torch-free.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from deploy import run_layout as layout
from mlpruning import __version__
from mlpruning.core.atomic import write_json
from mlpruning.core.contract import DEFAULT_VARIANTS, QUANTIZE_REPORT, Variant
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json

FORMAT = 1
# Versions shown in the report, in this order; others recorded by a stage follow.
VERSION_KEYS = ("python", "mlpruning", "torch", "transformers", "onnx", "onnxruntime")


def is_baseline(summary: dict[str, Any], variant: str) -> bool:
    """Whether ``variant`` is the run's dense baseline (summaries before the flag: ``dense``)."""
    entry = summary["variants"].get(variant) or {}
    return bool(entry.get("baseline", variant == summary.get("baseline", DEFAULT_VARIANTS[0].name)))


def point_key(batch: int, seq: int) -> str:
    return f"{batch}x{seq}"


def main_metric(task: str | None, metrics: dict[str, Any]) -> str | None:
    """The task's headline metric; for an unknown task the first metric that is not a ratio."""
    from pipeline.tasks import TASKS  # torch-free module

    if task in TASKS and TASKS[task].main_metric in metrics:
        return TASKS[task].main_metric
    names = [k for k in metrics if not k.startswith("remaining_ratio")]
    return names[0] if names else None


def _checkpoint(run: Path, variant: Variant) -> dict[str, Any]:
    folder = layout.checkpoint_dir(run, variant)
    manifest = read_json(folder / "pruning.json")
    structure = read_json(folder / "structure.json")
    if structure is None and manifest is not None and manifest.get("layers"):
        from pipeline.pruning.summary import structure as derive  # torch-free module

        structure = derive(manifest)
    versions: dict[str, Any] = {}
    for meta in (read_json(folder / "mlpruning.json"), manifest):
        versions.update((meta or {}).get("versions") or {})
    return {
        "eval": read_json(folder / "eval.json"),
        "manifest": manifest,
        "structure": structure,
        "versions": versions,
    }


def _remaining_ratio(dense: bool, ckpt: dict[str, Any]) -> float | None:
    if dense:
        return 1.0
    for source in (ckpt["eval"], ckpt["structure"], ckpt["manifest"]):
        if source and source.get("remaining_ratio") is not None:
            return float(source["remaining_ratio"])
    return None


def _stage_label(stage: str) -> str:
    path = Path(stage)
    return {"onnx": "export", "opt": "optimize", "quant": "quantize"}.get(path.parent.name, path.name)


def _parity(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    keys = ("max_abs", "p99_abs", "max_rel", "failing_elements", "elements", "atol_that_passes", "passed")
    stages = [
        {
            "stage": _stage_label(str(s.get("stage", "?"))),
            "path": s.get("stage"),
            **{k: s.get(k) for k in keys},
            "gating": s.get("gating", True),  # reports before INT8 held only gating stages
        }
        for s in report.get("stages", [])
    ]
    metric = report.get("metric") or {}
    return {
        "passed": bool(report.get("passed")),
        "tolerance": report.get("tolerance"),
        "stages": stages,
        "metric_passed": metric.get("passed"),
        "identical_predictions": metric.get("identical_predictions"),
        "agreement_rule": metric.get("agreement_rule", "same class"),
        "examples": metric.get("examples"),
    }


def _stats(block: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("p50_ms", "p90_ms", "p99_ms", "throughput_seq_per_s")
    return {k: (block or {}).get(k) for k in keys}


def _latency(report: dict[str, Any], side: str, source: str, dense: bool) -> dict[str, Any]:
    """Points of one side (``model`` or ``baseline``) of a bench report."""
    points = []
    for p in report.get("points", []):
        if side not in p:
            continue
        base = p.get("baseline") if side == "model" else p[side]
        speedup = p.get("speedup_median") if side == "model" else None
        points.append(
            {
                "batch": p["batch"],
                "seq": p["seq"],
                "key": point_key(p["batch"], p["seq"]),
                **_stats(p[side]),
                "dense_p50_ms": p[side].get("p50_ms") if dense else (base or {}).get("p50_ms"),
                # dense against itself is 1 by definition, whatever noise one run measured
                "speedup": 1.0 if dense else speedup,
            }
        )
    return {"source": source, "config": report.get("config"), "points": points}


def _dense_latency(run: Path) -> dict[str, Any] | None:
    """Dense latency from its own report, else from the baseline side of a pruned variant's."""
    base = layout.baseline(run)
    own = read_json(layout.bench_report(run, base))
    if own is not None:
        return _latency(own, "model", f"bench/{base.name}.json", dense=True)
    for variant in layout.variants(run):
        report = read_json(layout.bench_report(run, variant)) if not variant.baseline else None
        if report and report.get("baseline") and report.get("points"):
            return _latency(report, "baseline", f"bench/{variant.name}.json (baseline side)", dense=True)
    return None


def _params(run: Path, variant: Variant) -> dict[str, int] | None:
    # an INT8 copy carries its source's optimize.json
    opt = read_json(layout.model_dir(run, variant) / "optimize.json")
    passes = (opt or {}).get("passes") or []
    if not passes:
        return None
    return {"before": passes[0].get("params_before"), "after": passes[-1].get("params_after")}


def _size(run: Path, variant: Variant) -> int | None:
    model = layout.model_dir(run, variant) / "model.onnx"
    return model.stat().st_size if model.is_file() else None


def _stages(
    run: Path, variant: Variant, ckpt: dict[str, Any], latency: dict[str, Any] | None
) -> dict[str, bool]:
    stages = {
        # a linked teacher may come without eval.json: its metric is then missing, not the stage
        "checkpoint": ckpt["eval"] is not None
        or (layout.checkpoint_dir(run, variant) / "config.json").is_file(),
        # an INT8 copy's export is its fp32 source's
        "export": (layout.onnx_dir(run, variant.int8_of or variant) / "model.onnx").is_file(),
        "optimize": (layout.opt_dir(run, variant) / "model.onnx").is_file(),
        "quantize": (layout.quant_dir(run, variant) / "model.onnx").is_file(),
        "verify": layout.verify_report(run, variant).is_file(),
        "bench": latency is not None,
    }
    # the baseline is deployed from its export, an INT8 copy from its quantized folder
    del stages["quantize" if not variant.int8_of else "optimize"]
    if variant.baseline:
        del stages["optimize"]
    return stages


QUANTIZATION_KEYS = ("mode", "per_channel", "reduce_range", "symmetric", "int8_embeddings", "keep_fp32")


def _quantization(run: Path, variant: Variant) -> dict[str, Any] | None:
    """How an INT8 copy was made, from its ``quantize.json`` (None for an fp32 variant)."""
    report = read_json(layout.quant_dir(run, variant) / QUANTIZE_REPORT) if variant.int8_of else None
    if not report:
        return None
    chosen = report.get("chosen") or {}
    return {
        **{k: chosen.get(k) for k in QUANTIZATION_KEYS},
        "target": report.get("target"),
        "candidates": len(report.get("candidates") or []),
        "cpu": report.get("cpu"),
    }


def _metric(
    task: str | None, ckpt_eval: dict[str, Any] | None, verify: dict[str, Any] | None
) -> dict[str, Any]:
    torch_metrics = (ckpt_eval or {}).get("metrics") or {}
    onnx_metrics = ((verify or {}).get("metric") or {}).get("onnx") or {}
    name = main_metric(task, torch_metrics or onnx_metrics)
    pytorch, onnx = torch_metrics.get(name), onnx_metrics.get(name)
    return {"name": name, "pytorch": pytorch, "onnx": onnx, "value": onnx if onnx is not None else pytorch}


def _variant(run: Path, variant: Variant, task: str | None) -> dict[str, Any] | None:
    ckpt = _checkpoint(run, variant)
    verify = read_json(layout.verify_report(run, variant))
    if variant.baseline:
        latency = _dense_latency(run)
    else:
        report = read_json(layout.bench_report(run, variant))
        latency = _latency(report, "model", f"bench/{variant.name}.json", dense=False) if report else None
    stages = _stages(run, variant, ckpt, latency)
    if not any(stages.values()):
        return None
    dense = variant.checkpoint == layout.baseline(run).checkpoint  # the baseline or its INT8 copy
    return {
        "baseline": variant.baseline,
        "stages": stages,
        "missing": [name for name, there in stages.items() if not there],
        "model_dir": str(layout.model_dir(run, variant).relative_to(run)),
        "metric": _metric(task, ckpt["eval"], verify),
        "remaining_ratio": _remaining_ratio(dense, ckpt),
        "params": _params(run, variant),
        "size_bytes": _size(run, variant),
        "int8_of": variant.int8_of,
        "quantization": _quantization(run, variant),
        "structure": None if dense else ckpt["structure"],
        "parity": _parity(verify),
        "latency": latency,
    }


def _task(run: Path) -> str | None:
    for variant in layout.variants(run):
        for path in (
            layout.checkpoint_dir(run, variant) / "eval.json",
            layout.checkpoint_dir(run, variant) / "pruning.json",
        ):
            task = (read_json(path) or {}).get("task")
            if task:
                return str(task)
        task = ((read_json(layout.verify_report(run, variant)) or {}).get("metric") or {}).get("task")
        if task:
            return str(task)
    return None


def _environment(run: Path) -> dict[str, Any] | None:
    """Hardware as the bench saw it: the first bench report's environment and thread count."""
    for variant in layout.variants(run):
        report = read_json(layout.bench_report(run, variant))
        if report and report.get("environment"):
            threads = (report.get("config") or {}).get("threads")
            return {**report["environment"], "threads": threads, "source": f"bench/{variant.name}.json"}
    return None


def _versions(run: Path, environment: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Versions the stages recorded, plus those the run did not record read here (and named)."""
    found: dict[str, Any] = {}
    for variant in layout.variants(run):
        found.update(_checkpoint(run, variant)["versions"])
        export = read_json(layout.onnx_dir(run, variant) / "export.json") or {}
        found.update({k: export[k] for k in ("torch", "onnxruntime", "onnx") if export.get(k)})
    for key in ("python", "onnxruntime", "mlpruning"):
        if environment and environment.get(key):
            found[key] = environment[key]
    here = {"python": platform.python_version(), "mlpruning": __version__}
    for name in ("onnx", "onnxruntime"):
        try:
            here[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    from_here = [k for k in VERSION_KEYS if k not in found and k in here]
    found.update({k: here[k] for k in from_here})
    ordered = {k: found[k] for k in VERSION_KEYS if k in found}
    return {**ordered, **{k: v for k, v in found.items() if k not in ordered}}, from_here


def _failed_stages(run: Path) -> dict[str, str]:
    """Stages the run recorded as failed (quantize found no INT8 copy within its bounds), with why."""
    stages = (read_json(run / layout.RUN_STATE, "delete it to rerun every stage") or {}).get("stages") or {}
    return {name: str(rec.get("reason")) for name, rec in stages.items() if rec.get("status") == "failed"}


def build_summary(run: Path) -> dict[str, Any]:
    """Collect every stage's numbers of a run folder (see the module docstring)."""
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist: pass the folder `mlpruning run` wrote")
    task = _task(run)
    variants = {}
    absent = []
    for variant in layout.variants(run):
        entry = _variant(run, variant, task)
        if entry is None:
            absent.append(variant.name)
        else:
            variants[variant.name] = entry
    if not variants:
        raise UserError(f"{run} holds no stage output: run `mlpruning run CONFIG` first")
    environment = _environment(run)
    versions, from_here = _versions(run, environment)
    metric_names = [v["metric"]["name"] for v in variants.values() if v["metric"]["name"]]
    return {
        "format": FORMAT,
        "run": run.name,
        "task": task,
        "metric_name": metric_names[0] if metric_names else None,
        "baseline": layout.baseline(run).name,
        "variants": variants,
        "absent_variants": absent,
        "failed_stages": _failed_stages(run),
        "environment": environment,
        "versions": versions,
        "versions_read_at_report_time": from_here,
        "tool_version": __version__,
    }


def write_summary(run: Path) -> dict[str, Any]:
    """Build the summary and write ``RUN/summary.json`` atomically; return it."""
    summary = build_summary(run)
    write_json(run / layout.SUMMARY, summary)
    return summary


def load_summary(path: Path) -> dict[str, Any]:
    """A run folder (summarized now) or a ``summary.json`` file."""
    if path.is_dir():
        return build_summary(path)
    data = read_json(path)
    if data is None:
        raise UserError(f"{path} does not exist: pass a run folder or its summary.json")
    if data.get("format") != FORMAT or "variants" not in data:
        raise UserError(f"{path} is not a summary.json (format {FORMAT}): pass a run folder instead")
    return data
