"""Engine subcommands: export-triton (a Triton model repository) and build (a TensorRT engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mlpruning.cli.common import app, int_list
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json

SourceArg = Annotated[
    Path, typer.Argument(help="Run folder (mlpruning run) or a folder with model.onnx / model.plan.")
]
VariantOpt = Annotated[
    str | None,
    typer.Option(
        "--variant",
        help="Run folder only: a variant run.json lists (default: the last fp32 one, the most pruned).",
    ),
]


def _ints(values: list[str], flag: str) -> tuple[int, ...]:
    return int_list(values, flag, f"{flag} 1,8,32")


@app.command("export-triton")
def export_triton(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", help="Triton model repository to write the model into.")],
    variant: VariantOpt = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Model name (default: RUN_variant or the folder name).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="onnxruntime (model.onnx) or tensorrt (model.plan from mlpruning build).")
    ] = "onnxruntime",
    max_batch_size: Annotated[int, typer.Option(help="Largest batch Triton forms (0: no batching).")] = 32,
    preferred_batch: Annotated[
        list[str] | None,
        typer.Option("--preferred-batch", help="Dynamic batching targets (default: 4,8,16)."),
    ] = None,
    max_queue_delay_us: Annotated[
        int, typer.Option(help="How long a request may wait for a batch to fill (microseconds).")
    ] = 100,
    instances: Annotated[int, typer.Option(help="Model instances per device.")] = 1,
    device: Annotated[
        str | None,
        typer.Option(help="Instance kind: cpu or gpu (default: cpu for onnxruntime, gpu for tensorrt)."),
    ] = None,
    inline_functions: Annotated[
        bool,
        typer.Option("--inline-functions", help="Inline BlockSparseLinear bodies (for Triton's older ORT)."),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace REPO/<name> if it exists.")] = False,
) -> None:
    """Write a Triton model repository entry: config.pbtxt, the model, tokenizer files, metadata."""
    from deploy.triton import TritonOptions
    from deploy.triton import export_triton as run_export

    default = tuple(b for b in (4, 8, 16) if b <= max_batch_size)
    preferred = _ints(preferred_batch, "--preferred-batch") if preferred_batch else default
    try:
        opts = TritonOptions(
            backend, max_batch_size, preferred, max_queue_delay_us, instances, device, inline_functions
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    report = run_export(source, out, opts, name, variant, overwrite)
    typer.echo(json.dumps(report, indent=2))
    if not report["schema_checked"]:
        typer.echo("note: tritonclient[grpc] is not installed, config checked structurally only", err=True)


def _max_seq(folder: Path) -> int:
    """512, or less when the model's position table is shorter."""
    from mlpruning.core.hf_config import position_limit

    return min(512, position_limit(read_json(folder / "config.json", "re-run mlpruning export") or {}))


@app.command()
def build(
    source: SourceArg,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for model.plan (default: the model's folder).")
    ] = None,
    variant: VariantOpt = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Allow FP16 kernels.")] = False,
    int8: Annotated[
        bool,
        typer.Option("--int8", help="Build an INT8 engine from a QDQ model (quantize --target tensorrt)."),
    ] = False,
    sparsity: Annotated[
        bool, typer.Option("--sparsity", help="Use 2:4 sparse kernels for weights that are 2:4.")
    ] = False,
    plugin: Annotated[
        bool,
        typer.Option("--plugin", help="Keep BlockSparseLinear as a plugin call (needs a registered plugin)."),
    ] = False,
    batch: Annotated[
        list[str] | None, typer.Option("--batch", help="Profile batch MIN,OPT,MAX (default: 1,8,64).")
    ] = None,
    seq: Annotated[
        list[str] | None, typer.Option("--seq", help="Profile sequence MIN,OPT,MAX (default: 1,128,512).")
    ] = None,
    workspace: Annotated[int, typer.Option(min=64, help="Builder workspace in MiB.")] = 4096,
    tf32: Annotated[
        bool, typer.Option("--tf32", help="Allow TF32 matmuls (faster; off keeps fp32 parity).")
    ] = False,
) -> None:
    """Build a TensorRT engine (model.plan) from an optimized ONNX model; needs tensorrt and a GPU."""
    from deploy.triton import resolve_model_folder
    from deploy.trt_engine import BuildOptions, Profile, build_engine

    folder, _ = resolve_model_folder(source, variant)
    top = _max_seq(folder)
    try:
        profile = Profile(
            _ints(batch or ["1,8,64"], "--batch"), _ints(seq or [f"1,{min(128, top)},{top}"], "--seq")
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    opts = BuildOptions(fp16, sparsity, plugin, workspace, profile, tf32, int8)
    report = build_engine(folder, out or folder, opts)
    typer.echo(json.dumps(report, indent=2))
    typer.echo(f"PASSED: {report['plan']} in {report['build_s']} s")
