"""`mlpruning run CONFIG.toml`: the whole pipeline in one command (registered on the shared app)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from mlpruning.cli.common import app, echo_err, set_threads, stderr_console
from mlpruning.core.atomic import make_writable_dir
from mlpruning.core.errors import UserError


def _stage_names(requested: list[str] | None, known: list[str]) -> set[str]:
    chosen = set()
    for name in requested or []:
        matches = [k for k in known if k == name or k.split(":")[0] == name]
        if not matches:
            raise UserError(f"--rerun {name}: no such stage; stages: {', '.join(known)}")
        chosen.update(matches)
    return chosen


@app.command("run")
def run_pipeline(
    config: Annotated[Path, typer.Argument(help="Run config (TOML), e.g. configs/run-quick-sst2.toml.")],
    out: Annotated[Path | None, typer.Option("--out", help="Run folder [runs/<config name>].")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads for the training stages [run.threads].")
    ] = None,
    device: Annotated[str, typer.Option(help="Training device: auto, cpu, cuda.")] = "auto",
    rerun: Annotated[
        list[str] | None,
        typer.Option("--rerun", help="Run these stages again even if unchanged (e.g. bench, verify:step1)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Teacher, step 1, step 2, export, optimize, verify, bench and report into one run folder;
    stages whose inputs are unchanged are skipped, so a crashed run restarts where it stopped."""
    from deploy.report import write_report
    from mlpruning.cli.run_config import load_run_config
    from mlpruning.cli.run_stages import StageActions, build_stages
    from mlpruning.cli.runner import RunState, execute
    from pipeline.progress import TrainProgress
    from pipeline.trainloop import Interrupted

    if not config.is_file():
        raise UserError(f"run config {config} not found: e.g. configs/run-quick-sst2.toml")
    run = out or Path("runs") / config.stem
    cfg = load_run_config(config, run)
    set_threads(threads or cfg.threads)
    console = stderr_console()
    actions = StageActions(cfg, run, device, TrainProgress(enabled=not quiet, console=console))
    stages = build_stages(actions)
    forced = _stage_names(rerun, [s.name for s in stages])
    make_writable_dir(run)
    console.print(f"run {config} -> {run}: {len(stages)} stages")
    try:
        log = partial(console.print, markup=False, highlight=False)  # "[step1]" is not rich markup
        results = execute(stages, cfg, RunState(run, config, cfg.variants), log, forced)
    except Interrupted:
        echo_err(f"interrupted: state saved in {run}; run the same command again to continue")
        raise typer.Exit(130) from None
    paths = write_report(run)
    verified = {
        name: r for name, r in results.items() if name.startswith("verify:") and "blocked" not in (r or {})
    }
    failed = [name for name, r in verified.items() if not (r or {}).get("passed")]
    failed += [name for name, r in results.items() if "failed" in (r or {})]
    typer.echo(f"report: {paths['html']} and {paths['markdown']}")
    if failed:
        echo_err(f"failed: {', '.join(failed)}: see {paths['markdown']}")
        raise typer.Exit(1)
