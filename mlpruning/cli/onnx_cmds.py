"""ONNX subcommands: export, optimize, verify, bench (registered on the shared app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mlpruning.cli.common import DataDirOpt, TaskOpt, app, echo_err, int_list
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json

ProviderOpt = Annotated[
    str, typer.Option("--provider", help="ONNX Runtime provider: cpu, cuda or tensorrt (onnxruntime-gpu).")
]
EngineOpt = Annotated[
    bool,
    typer.Option(
        "--engine", help="Run the folder's model.plan (mlpruning build); automatic when it has no model.onnx."
    ),
]


@app.command()
def export(
    ckpt: Annotated[Path, typer.Argument(help="Masked (prune) or fine-tuned (finetune) checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for model.onnx and its manifest.")],
    opset: Annotated[int, typer.Option(help="ONNX opset (dynamo needs >= 18).", min=14)] = 17,
    exporter: Annotated[
        str, typer.Option(help="torchscript (measured faster on CPU) or dynamo.")
    ] = "torchscript",
) -> None:
    """Export a checkpoint to ONNX (full size, zeros in place) with its pruning manifest."""
    from pipeline.export import ExportMismatch, export_onnx

    try:
        report = export_onnx(ckpt, out, opset, exporter)
    except ExportMismatch as exc:
        echo_err(str(exc))
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"out": str(out), **report}, indent=2))


@app.command()
def optimize(
    model_dir: Annotated[Path, typer.Argument(help="Folder written by mlpruning export.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the stripped model.")],
    num_heads: Annotated[
        int | None,
        typer.Option(
            "--num-heads", min=1, help="Head count, for a folder with neither pruning.json nor config.json."
        ),
    ] = None,
    scatter_rows: Annotated[
        str,
        typer.Option(help="O/FFN-out pruned output rows: auto (timed here), dense or scatter."),
    ] = "auto",
    ort_fusion: Annotated[
        bool, typer.Option("--ort-fusion", help="Try ONNX Runtime's fusions; kept only if measured faster.")
    ] = False,
    block_sparse: Annotated[
        str, typer.Option(help="Block-pruned matrices: auto (timed here), dense or sparse.")
    ] = "auto",
    block: Annotated[
        str,
        typer.Option(
            help="Search the weights for zero blocks: auto (16 to 64 wide), none, or N / RxC (e.g. 32x16)."
        ),
    ] = "auto",
) -> None:
    """Physically strip pruned heads, FFN rows and zero blocks from an exported model (torch-free passes)."""
    from graph_passes.optimize import optimize as run_passes
    from graph_passes.registry import OptimizeOptions

    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} does not exist: check the path")
    try:
        options = OptimizeOptions(num_heads, scatter_rows, block_sparse, block, ort_fusion)
    except ValueError as exc:  # the message names the field: name the flag instead
        message = str(exc)
        for field in ("scatter_rows", "block_sparse", "num_heads"):
            message = message.replace(field, "--" + field.replace("_", "-"))
        raise UserError(message) from None
    report = run_passes(model_dir, out, options)
    typer.echo(json.dumps({"out": str(out), **report}, indent=2))


@app.command()
def verify(
    model_dir: Annotated[
        Path, typer.Argument(help="Optimized (or exported) folder with model.onnx (or model.plan).")
    ],
    reference: Annotated[
        Path, typer.Option("--reference", help="The checkpoint it came from (prune/finetune).")
    ],
    task: TaskOpt = None,
    stage: Annotated[
        list[Path] | None, typer.Option("--stage", help="Earlier folders to check too (default: the export).")
    ] = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance.")] = 1e-3,
    min_agreement: Annotated[
        float | None,
        typer.Option(help="Share of dev predictions that must agree with PyTorch (0-1) [1.0; INT8: 0.99]."),
    ] = None,
    max_metric_drop: Annotated[
        float | None,
        typer.Option(
            help="Largest drop of the main metric below PyTorch's, in its units (0.01 = 1 point) "
            "[unbounded; INT8: 0.01]."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    provider: ProviderOpt = "cpu",
    engine: EngineOpt = False,
) -> None:
    """Check ONNX outputs against PyTorch (per stage) and the dev-set metric; exit 1 on failure."""
    from deploy.verify import Tolerance, dumps, summary_lines
    from deploy.verify import verify as run_verify
    from mlpruning.core.atomic import write_text

    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} does not exist: check the path")
    stages = list(stage or []) or _export_stage(model_dir)
    if engine and not stage and (model_dir / "model.onnx").is_file():
        stages.append(model_dir)  # the engine's own ONNX as a stage: a gap then points at the build
    try:
        tol = Tolerance(atol, rtol, min_agreement, max_metric_drop)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = run_verify([*stages, model_dir], reference, task, data_dir, tol, 0, provider, engine)
    if report:
        write_text(report, dumps(result) + "\n")
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo("PASSED" if result["passed"] else "FAILED")
    if not result["passed"]:
        raise typer.Exit(1)


def _export_stage(model_dir: Path) -> list[Path]:
    """The export folder an optimized folder came from, when it still exists."""
    report = read_json(model_dir / "optimize.json", "re-run mlpruning optimize")
    if report is None:
        return []
    source = Path(report.get("source", ""))
    return [source] if (source / "model.onnx").is_file() and source.resolve() != model_dir.resolve() else []


def _int_list(values: list[str], flag: str) -> tuple[int, ...]:
    return int_list(values, flag, f"{flag} 1,8 or {flag} 1 {flag} 8")


@app.command()
def bench(
    model_dir: Annotated[
        Path, typer.Argument(help="Folder with model.onnx (export or optimize output) or model.plan (build).")
    ],
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="Dense folder to compare against.")
    ] = None,
    batch: Annotated[
        list[str] | None, typer.Option("--batch", help="Batch sizes: 1,8 or repeat the flag [default: 1,8].")
    ] = None,
    seq: Annotated[
        list[str] | None,
        typer.Option("--seq", help="Sequence lengths: 128,384 or repeat [default: 128,384]."),
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="ORT intra-op threads.")] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved timing rounds.")] = 7,
    iters: Annotated[int, typer.Option(min=1, help="Runs per model per round.")] = 10,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    provider: ProviderOpt = "cpu",
    engine: EngineOpt = False,
) -> None:
    """Latency (p50/p90/p99) on a provider or engine, and speedup vs --baseline from interleaved rounds."""
    from deploy.bench import BenchConfig, dumps, format_table
    from deploy.bench import bench as run_bench
    from mlpruning.core.atomic import write_text

    try:
        batches, seqs = _int_list(batch or ["1,8"], "--batch"), _int_list(seq or ["128,384"], "--seq")
        cfg = BenchConfig(batches, seqs, threads, 5, rounds, iters, provider, engine)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = run_bench(model_dir, baseline, cfg)
    if report:
        write_text(report, dumps(result) + "\n")
    typer.echo(format_table(result))
