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
      quant/<variant>-int8/     quantize output of each variant's INT8 copy (with [quantize])
      verify/<variant>.json     verify report (parity per stage + dev metric) of each variant
      bench/<variant>.json      bench report of each variant against onnx/dense (interleaved)
      summary.json              the numbers the report and the regression gate read
      report.md, report.html    mlpruning report

A run's variants are data (:class:`mlpruning.core.contract.Variant`): the run config makes the
list (the dense teacher as the baseline, then one per pruning step) and ``run.json`` records it,
so every reader takes the list from the run folder; a folder written before ``run.json`` had
it holds ``dense``, ``step1`` and ``step2``. The deployable model of a variant is
``opt/<variant>``, ``onnx/<variant>`` for the baseline and ``quant/<variant>`` for an INT8 copy.
"""

from __future__ import annotations

from pathlib import Path

from mlpruning.core.contract import DEFAULT_VARIANTS, Variant
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json

RUN_STATE = "run.json"
SUMMARY = "summary.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REDO = "delete run.json and run the config again"


def variants(run: Path) -> tuple[Variant, ...]:
    """The run's variants, in pipeline order, as its ``run.json`` lists them."""
    listed = (read_json(run / RUN_STATE, "delete it to rerun every stage") or {}).get("variants")
    if listed is None:
        return DEFAULT_VARIANTS
    try:
        found = tuple(
            Variant(str(v["name"]), str(v["checkpoint"]), bool(v["baseline"]), v.get("int8_of"))
            for v in listed
        )
    except (TypeError, KeyError, ValueError) as exc:
        raise UserError(f"{run / RUN_STATE}: bad 'variants' entry ({exc}): {REDO}") from None
    if sum(v.baseline for v in found) != 1:
        raise UserError(f"{run / RUN_STATE}: 'variants' needs exactly one baseline: {REDO}")
    return found


def variant_named(run: Path, name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    for variant in variants(run):
        if variant.name == name:
            return variant
    known = ", ".join(v.name for v in variants(run))
    raise UserError(f"unknown variant '{name}': use one of {known}")


def baseline(run: Path) -> Variant:
    return next(v for v in variants(run) if v.baseline)


def checkpoint_dir(run: Path, variant: str | Variant) -> Path:
    """The PyTorch checkpoint of a variant (the teacher for the baseline)."""
    return run / variant_named(run, variant).checkpoint


def _name(variant: str | Variant) -> str:
    return variant.name if isinstance(variant, Variant) else variant


def onnx_dir(run: Path, variant: str | Variant) -> Path:
    return run / "onnx" / _name(variant)


def opt_dir(run: Path, variant: str | Variant) -> Path:
    return run / "opt" / _name(variant)


def quant_dir(run: Path, variant: str | Variant) -> Path:
    return run / "quant" / _name(variant)


def model_dir(run: Path, variant: str | Variant) -> Path:
    """The folder a variant is deployed from: its export (baseline), optimized or quantized folder."""
    found = variant_named(run, variant)
    return run / found.folder / found.name


def verify_report(run: Path, variant: str | Variant) -> Path:
    return run / "verify" / f"{_name(variant)}.json"


def bench_report(run: Path, variant: str | Variant) -> Path:
    return run / "bench" / f"{_name(variant)}.json"


def present_variants(run: Path) -> list[str]:
    """Variants whose deployable model exists, in pipeline order."""
    return [v.name for v in variants(run) if (model_dir(run, v) / "model.onnx").is_file()]


def default_variant(run: Path, present: list[str]) -> str:
    """What serve, build and export-triton deploy when no variant is named: the last fp32 variant
    present (the most pruned), not an INT8 copy, which is chosen only by name (its integer ops
    are this CPU's pick and a TensorRT build cannot take them)."""
    fp32 = [name for name in present if not variant_named(run, name).int8_of]
    return (fp32 or present)[-1]


def resolve_variant(
    path: Path, variant: str | None = None, model_files: tuple[str, ...] = ("model.onnx",)
) -> tuple[Path, str | None]:
    """(model folder, variant) for a model folder (one of ``model_files`` in it) or a run folder.

    A model folder is taken as it is when no variant is named; a run folder gives the named
    variant's model or, by default, :func:`default_variant`. Anything else is a one-line UserError.
    """
    if not path.is_dir():
        raise UserError(f"{path} does not exist: pass a run folder or a folder with model.onnx")
    if variant is None and any((path / f).is_file() for f in model_files):
        return path, None
    if variant is not None:
        variant_named(path, variant)  # a one-line error for a name the run does not have
    present = present_variants(path)
    if not present:
        raise UserError(
            f"{path} holds neither model.onnx nor a run's models (opt/<variant>/model.onnx): pass a "
            "run folder (mlpruning run) or a folder written by export, optimize or build"
        )
    chosen = variant or default_variant(path, present)
    if chosen not in present:
        raise UserError(f"variant '{chosen}' is not in {path}: use one of {', '.join(present)}")
    return model_dir(path, chosen), chosen
