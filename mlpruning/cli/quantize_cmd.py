"""`mlpruning quantize`: an INT8 copy of an fp32 model folder (registered on the shared app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mlpruning.cli.common import DataDirOpt, TaskOpt, app
from mlpruning.core.errors import UserError
from mlpruning.core.tolerance import INT8_MAX_METRIC_DROP, INT8_MIN_AGREEMENT


@app.command()
def quantize(
    model_dir: Annotated[Path, typer.Argument(help="fp32 folder: optimize's output (or a dense export).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the INT8 model.")],
    mode: Annotated[str, typer.Option(help="auto (measure both), dynamic or static (QDQ).")] = "auto",
    search: Annotated[
        str, typer.Option(help="quick (per-channel on/off) or full (adds reduce-range, per-tensor static).")
    ] = "quick",
    calibration_examples: Annotated[
        int, typer.Option(help="Static mode: training examples to calibrate on (seeded choice).")
    ] = 256,
    calibrate_method: Annotated[
        str, typer.Option(help="Static mode: minmax, entropy or percentile.")
    ] = "minmax",
    max_metric_drop: Annotated[
        float, typer.Option(help="Largest dev-metric drop against the fp32 model (0.01: one point).")
    ] = INT8_MAX_METRIC_DROP,
    min_agreement: Annotated[
        float, typer.Option(help="Smallest share of dev predictions that must match the fp32 model's.")
    ] = INT8_MIN_AGREEMENT,
    target: Annotated[
        str,
        typer.Option(
            help="cpu (ONNX Runtime, fastest passing here) or tensorrt (symmetric int8 QDQ for build --int8)."
        ),
    ] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="ONNX Runtime threads for scoring and timing.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Quantize to INT8 with ONNX Runtime: every candidate (dynamic, static QDQ, per-channel) is
    scored on the dev set and timed here; the fastest within the bounds is written."""
    from deploy.quantize import quantize as run_quantize
    from deploy.quantize_parts import QuantizeOptions

    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} does not exist: check the path")
    try:
        options = QuantizeOptions(
            mode=mode,
            search=search,
            calibration_examples=calibration_examples,
            calibrate_method=calibrate_method,
            max_metric_drop=max_metric_drop,
            min_agreement=min_agreement,
            seed=seed,
            threads=threads,
            task=task,
            target=target,
        )
    except ValueError as exc:  # the message names the field: name the flag instead
        message = str(exc)
        fields = (
            "calibration_examples",
            "calibrate_method",
            "max_metric_drop",
            "min_agreement",
            "mode",
            "target",
        )
        for field in fields:
            message = message.replace(field, "--" + field.replace("_", "-"))
        raise UserError(message) from None
    report = run_quantize(model_dir, out, options, data_dir)
    typer.echo(json.dumps({"out": str(out), **report}, indent=2))
