"""Where `mlpruning run` puts each stage's output inside a run folder.

One run folder holds the whole pipeline for one task; every later command (report, compare,
serve, export-triton, build) reads it through these names only:

    RUN/
      run.json                  config snapshot, per-stage input hashes, times (the runner's state)
      teacher/                  dense fine-tuned checkpoint (absent when the config names one)
      step1/                    step-1 masked checkpoint (mlpruning prune)
      step2/                    step-2 masked checkpoint (optional: prune --step block)
      onnx/<variant>/           export of the dense teacher and each pruned checkpoint
      opt/<variant>/            optimize output of each pruned variant (model.onnx, optimize.json,
                                pruning.json, config.json, tokenizer files)
      verify/<variant>.json     verify report (parity per stage + dev metric) of each variant
      bench/<variant>.json      bench report of each variant against onnx/dense (interleaved)
      summary.json              the numbers the report and the regression gate read
      report.md, report.html    mlpruning report

Variants are ``dense`` (the teacher's export; also the latency baseline), ``step1`` and
``step2``. The deployable model of a variant is ``opt/<variant>`` for pruned ones and
``onnx/dense`` for the dense one.
"""

from __future__ import annotations

from pathlib import Path

from mlpruning.core.contract import VARIANTS
from mlpruning.core.errors import UserError

RUN_STATE = "run.json"
SUMMARY = "summary.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def checkpoint_dir(run: Path, variant: str) -> Path:
    """The PyTorch checkpoint of a variant (the teacher for ``dense``)."""
    return run / ("teacher" if variant == "dense" else variant)


def onnx_dir(run: Path, variant: str) -> Path:
    return run / "onnx" / variant


def opt_dir(run: Path, variant: str) -> Path:
    return run / "opt" / variant


def model_dir(run: Path, variant: str) -> Path:
    """The folder a variant is deployed from (optimized for pruned variants)."""
    return onnx_dir(run, variant) if variant == "dense" else opt_dir(run, variant)


def verify_report(run: Path, variant: str) -> Path:
    return run / "verify" / f"{variant}.json"


def bench_report(run: Path, variant: str) -> Path:
    return run / "bench" / f"{variant}.json"


def present_variants(run: Path) -> list[str]:
    """Variants whose deployable model exists, in pipeline order."""
    return [v for v in VARIANTS if (model_dir(run, v) / "model.onnx").is_file()]


def best_variant(run: Path) -> str:
    """The most-pruned variant present (what serve and export-triton deploy by default)."""
    present = present_variants(run)
    if not present:
        raise FileNotFoundError(f"{run} holds no model: run `mlpruning run CONFIG` first")
    return present[-1]


def resolve_variant(
    path: Path, variant: str | None = None, model_files: tuple[str, ...] = ("model.onnx",)
) -> tuple[Path, str | None]:
    """(model folder, variant) for a model folder (one of ``model_files`` in it) or a run folder.

    A model folder is taken as it is when no variant is named; a run folder gives the named
    variant's model or, by default, the most-pruned one. Anything else is a one-line UserError.
    """
    if not path.is_dir():
        raise UserError(f"{path} does not exist: pass a run folder or a folder with model.onnx")
    if variant is None and any((path / f).is_file() for f in model_files):
        return path, None
    if variant is not None and variant not in VARIANTS:
        raise UserError(f"unknown variant '{variant}': use one of {', '.join(VARIANTS)}")
    present = present_variants(path)
    if not present:
        raise UserError(
            f"{path} holds neither model.onnx nor a run's models (opt/<variant>/model.onnx): pass a "
            "run folder (mlpruning run) or a folder written by export, optimize or build"
        )
    chosen = variant or present[-1]
    if chosen not in present:
        raise UserError(f"variant '{chosen}' is not in {path}: use one of {', '.join(present)}")
    return model_dir(path, chosen), chosen
