"""The serve subcommand: an HTTP server for a run's best model or a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlpruning.cli.common import app
from mlpruning.core.errors import UserError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@app.command()
def serve(
    target: Annotated[
        Path,
        typer.Argument(
            help="Run folder (serves its last fp32 variant, the most pruned) or a folder with model.onnx."
        ),
    ],
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant",
            help="Run variant to serve: dense, step1, step2, step1-int8, ... (run.json lists them).",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; the server has no authentication.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8000,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="ORT intra-op threads (default: ORT's choice, all cores)."),
    ] = None,
    provider: Annotated[str, typer.Option(help="ONNX Runtime provider: cpu, cuda or tensorrt.")] = "cpu",
    engine: Annotated[
        bool, typer.Option("--engine", help="Serve the folder's TensorRT model.plan (mlpruning build).")
    ] = False,
    max_batch: Annotated[int, typer.Option(help="Most texts per model run (micro-batch).")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(help="Longest wait for a micro-batch to fill (0: no wait).")
    ] = 2.0,
    max_texts: Annotated[int, typer.Option(help="Most texts per request (more: 413).")] = 64,
    max_chars: Annotated[int, typer.Option(help="Most characters per text (more: 413).")] = 10_000,
    max_tokens: Annotated[
        int | None, typer.Option(help="Most tokens per text or pair (default: the model's limit).")
    ] = None,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="Cut texts over --max-tokens instead of answering 413.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: warning, info, debug.")] = "info",
) -> None:
    """Serve predictions over HTTP (/predict, /health, /metadata) with dynamic micro-batching."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"serving needs fastapi and uvicorn ({exc}): pip install 'mlpruning[serve]'"
        ) from None
    from deploy.serve import LOOPBACK, ServeConfig, resolve_target, run_server

    if log_level not in LOG_LEVELS:
        raise UserError(f"--log-level {log_level}: use one of {', '.join(LOG_LEVELS)}")
    model_dir, run_dir, chosen = resolve_target(target, variant)
    try:
        cfg = ServeConfig(
            model_dir=model_dir,
            run_dir=run_dir,
            variant=chosen,
            host=host,
            port=port,
            threads=threads,
            provider=provider,
            engine=engine,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_texts=max_texts,
            max_chars=max_chars,
            max_tokens=max_tokens,
            truncate=truncate,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if host not in LOOPBACK:
        typer.echo(f"warning: {host} exposes the server (no authentication) beyond this machine", err=True)
    typer.echo(f"serving {model_dir}" + (f" (run {run_dir}, variant {chosen})" if run_dir else ""))
    run_server(cfg, log_level)
