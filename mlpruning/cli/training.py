"""Training subcommands: tasks, finetune, eval, prune, inspect (registered on the shared app)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mlpruning.cli.common import (
    DataDirOpt,
    DeviceOpt,
    EpochsOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    SaveEveryOpt,
    SeedOpt,
    SubsetOpt,
    TaskOpt,
    ThreadsOpt,
    app,
    echo_err,
    set_threads,
    stderr_console,
)
from mlpruning.core.errors import UserError


@app.command()
def tasks(
    data_dir: DataDirOpt = None,
    check: Annotated[bool, typer.Option("--check", help="Read every split and verify checksums.")] = False,
) -> None:
    """List the supported tasks, their metrics and the data each split comes from."""
    from pipeline.tasks import TASKS, MissingSplit, load_split, locate

    for spec in TASKS.values():
        parts = []
        for split, _ in spec.split_files:
            try:
                path, embedded = locate(spec, split, data_dir)
            except MissingSplit:
                parts.append(f"{split}: -")
                continue
            rows = f" ({len(load_split(spec, split, data_dir))} rows)" if check else ""
            parts.append(f"{split}: {'embedded' if embedded else path}{rows}")
        typer.echo(
            f"{spec.name:5s} {spec.folder:6s} metrics={','.join(spec.metrics):16s} " + "; ".join(parts)
        )


@app.command()
def finetune(
    out: Annotated[Path, typer.Option("--out", help="Output folder for the fine-tuned checkpoint.")],
    task: TaskOpt = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model folder or hub id; default: embedded all-MiniLM-L6-v2."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with a [finetune] table.")
    ] = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate inputs to this many tokens.")] = None,
    seed: SeedOpt = None,
    save_every: SaveEveryOpt = None,
    max_train_examples: SubsetOpt = None,
    data_dir: DataDirOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a dense teacher on a GLUE task; writes an HF checkpoint and eval.json."""
    overrides = {
        "task": task,
        "model": model,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": lr,
        "max_length": max_length,
        "seed": seed,
        "save_every": save_every,
        "max_train_examples": max_train_examples,
        "data_dir": str(data_dir) if data_dir else None,
    }
    from pipeline.config import FinetuneConfig, build_config

    cfg = build_config(FinetuneConfig, "finetune", config, overrides, required=("task",))
    main_rank = _init_distributed(device)
    set_threads(threads)
    try:
        _run_finetune(cfg, out, device, (resume, overwrite), main_rank and not quiet, main_rank)
    except BaseException:
        _leave_distributed(wait=False)
        raise
    _leave_distributed(wait=True)


def _run_finetune(
    cfg: Any, out: Path, device: str, resume_overwrite: tuple[bool, bool], show: bool, main_rank: bool
) -> None:
    from pipeline.finetune import Finetuner
    from pipeline.progress import TrainProgress
    from pipeline.trainloop import Interrupted, check_out_dir

    resume, overwrite = resume_overwrite
    check_out_dir(out, resume, overwrite)
    console = stderr_console()
    runner = Finetuner(cfg, out, TrainProgress(enabled=show, console=console), device=device)
    if show:
        console.print(f"fine-tuning {cfg.model} on {cfg.task}: {runner.total_steps} steps -> {out}")
    try:
        result = runner.run(resume=resume)
    except Interrupted as exc:
        if main_rank:
            echo_err(
                f"interrupted at step {exc.step}/{exc.total}: state saved in {out}; continue with --resume"
            )
        raise typer.Exit(130) from None
    if main_rank:
        typer.echo(json.dumps({"out": str(out), **result.to_json()}, indent=2))


@app.command("eval")
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="Fine-tuned checkpoint folder.")],
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the result as JSON here.")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Evaluate a fine-tuned checkpoint on a task's dev set."""
    from mlpruning.core.atomic import write_json
    from pipeline.evaluate import evaluate_checkpoint

    set_threads(threads)
    result = evaluate_checkpoint(model_dir, task, data_dir)
    payload = {"model": str(model_dir), **result.to_json()}
    if report:
        write_json(report, payload)
    typer.echo(json.dumps(payload, indent=2))


def _init_distributed(device: str) -> bool:
    """Join the torchrun process group when launched with WORLD_SIZE > 1; True on rank 0.

    The backend follows the device this rank trains on (NCCL takes only CUDA tensors, so a
    ``--device cpu`` run on a GPU machine needs gloo), and a CUDA rank binds its own GPU first."""
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    import torch
    import torch.distributed as dist

    from pipeline.trainloop import resolve_device

    dev = resolve_device(device)
    # rank 0 evaluates alone while the others wait in a barrier: a long dev set on CPU must not
    # trip the default collective timeout (10 min for NCCL, 30 for gloo)
    timeout = datetime.timedelta(hours=2)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", timeout=timeout, device_id=dev)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return dist.get_rank() == 0


def _leave_distributed(wait: bool) -> None:
    """Tear the process group down before exit: a gloo rank exiting with it alive can abort."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_initialized():
        return
    if wait:  # every rank finished the run: let rank 0 finish writing before anyone leaves
        dist.barrier()
    dist.destroy_process_group()


@app.command()
def prune(
    out: Annotated[Path, typer.Option("--out", help="Output folder for the masked checkpoint.")],
    step: Annotated[
        str | None,
        typer.Option("--step", help="head_row (step 1, default) or block (step 2, needs --from)."),
    ] = None,
    from_: Annotated[
        Path | None, typer.Option("--from", help="Step 2: the step-1 checkpoint to block-prune.")
    ] = None,
    block: Annotated[
        str | None, typer.Option("--block", help="Step 2: block size, 32 or 32x16 (rows x cols) [32].")
    ] = None,
    row_balanced: Annotated[
        bool | None,
        typer.Option(
            "--row-balanced/--no-row-balanced", help="Step 2: same kept-block count in every block-row."
        ),
    ] = None,
    target_of: Annotated[
        str | None, typer.Option("--target-of", help="Step 2: --target is a share of 'step1' or 'original'.")
    ] = None,
    revive_from: Annotated[
        str | None, typer.Option("--revive-from", help="Step 2: weights of revived rows [step 1's init].")
    ] = None,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Fine-tuned dense teacher folder.")] = None,
    task: TaskOpt = None,
    target: Annotated[
        float | None, typer.Option("--target", help="Remaining encoder-weight ratio, in (0, 1].")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with a [prune] table.")] = None,
    student: Annotated[
        str | None, typer.Option("--student", help="Model to prune; default: the teacher.")
    ] = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (over all processes).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Weight learning rate.")] = None,
    mask_lr: Annotated[
        float | None, typer.Option("--mask-lr", help="Score and threshold learning rate.")
    ] = None,
    lambda_final: Annotated[
        float | None, typer.Option(help="Regularizer strength far from the target.")
    ] = None,
    threshold_grad: Annotated[
        str | None,
        typer.Option(help="Regularizer's push on thresholds: sigmoid (reference) or constant [sigmoid]."),
    ] = None,
    seed: SeedOpt = None,
    save_every: SaveEveryOpt = None,
    max_train_examples: SubsetOpt = None,
    data_dir: DataDirOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """MLPruning: step 1 prunes heads and rows to --target, distilled from --teacher; --step block
    prunes blocks of a step-1 checkpoint (--from) to --target of what it kept, distilled from it."""
    from pipeline.config import prune_step

    step = prune_step(config, step)
    overrides = {
        "task": task,
        "target": target,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": lr,
        "mask_learning_rate": mask_lr,
        "lambda_final": lambda_final,
        "threshold_grad": threshold_grad,
        "seed": seed,
        "save_every": save_every,
        "max_train_examples": max_train_examples,
        "data_dir": str(data_dir) if data_dir else None,
    }
    step1 = {"--teacher": teacher, "--student": student}
    step2 = {"--from": str(from_) if from_ else None, "--block": block, "--row-balanced": row_balanced}
    step2 |= {"--target-of": target_of, "--revive-from": revive_from}
    cfg = _prune_config(step, config, overrides, step1, step2)
    main_rank = _init_distributed(device)
    set_threads(threads)
    try:
        _run_pruner(step, cfg, out, device, (resume, overwrite), main_rank and not quiet, main_rank)
    except BaseException:
        _leave_distributed(wait=False)
        raise
    _leave_distributed(wait=True)


def _prune_config(
    step: str, config: Path | None, overrides: dict, step1: dict[str, Any], step2: dict[str, Any]
) -> Any:
    """The step's config from TOML and flags; a flag of the other step is a one-line error."""
    from pipeline.config import BlockPruneConfig, PruneConfig, build_config

    wrong = [k for k, v in (step1 if step == "block" else step2).items() if v is not None]
    if wrong and step == "block":
        raise UserError(
            f"{wrong[0]} is for step 1: with --step block the step-1 checkpoint (--from) is the teacher"
        )
    if wrong:
        raise UserError(f"{wrong[0]} is for block pruning: add --step block")
    if step == "block":
        keys = ("source", "block", "row_balanced", "target_of", "revive_from")
        overrides |= dict(zip(keys, step2.values(), strict=True))
        flags = {"source": "--from"}
        return build_config(
            BlockPruneConfig, "prune", config, overrides, ("source", "target"), ("step",), flags
        )
    overrides |= {"teacher": step1["--teacher"], "student": step1["--student"]}
    cfg = build_config(PruneConfig, "prune", config, overrides, ("teacher", "task", "target"), ("step",))
    if not Path(cfg.teacher).is_dir():
        raise UserError(f"teacher folder {cfg.teacher} does not exist: pass the output of mlpruning finetune")
    return cfg


def _run_pruner(
    step: str,
    cfg: Any,
    out: Path,
    device: str,
    resume_overwrite: tuple[bool, bool],
    show: bool,
    main_rank: bool,
) -> None:
    """Run step 1 or 2 into ``out`` with live progress; print the structure and a JSON summary."""
    from pipeline.progress import TrainProgress
    from pipeline.pruning.block_pruner import BlockPruner
    from pipeline.pruning.pruner import Pruner
    from pipeline.pruning.summary import format_table, structure
    from pipeline.trainloop import Interrupted, check_out_dir

    resume, overwrite = resume_overwrite
    check_out_dir(out, resume, overwrite)
    console = stderr_console()
    runner_cls = BlockPruner if step == "block" else Pruner
    runner = runner_cls(cfg, out, TrainProgress(enabled=show, console=console), device=device)
    if show:
        console.print(f"{runner.headline()} -> {out}")
    try:
        result = runner.run(resume=resume)
    except Interrupted as exc:
        if main_rank:
            echo_err(
                f"interrupted at step {exc.step}/{exc.total}: state saved in {out}; continue with --resume"
            )
        raise typer.Exit(130) from None
    if main_rank:
        manifest = json.loads((out / "pruning.json").read_text())
        console.print(format_table(structure(manifest)))
        ratios = {k: manifest[k] for k in ("remaining_ratio", "remaining_ratio_of_step1") if k in manifest}
        typer.echo(json.dumps({"out": str(out), **result.to_json(), **ratios}, indent=2))


@app.command()
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="Masked checkpoint folder (output of prune).")],
) -> None:
    """Verify a masked checkpoint (weights are zero wherever a mask is off) and show its structure."""
    from pipeline.pruning.checkpoint import load_masked
    from pipeline.pruning.summary import format_table, structure

    if not ckpt.is_dir():
        raise UserError(f"checkpoint folder {ckpt} does not exist: check the path")
    _, _, manifest = load_masked(ckpt)
    typer.echo(format_table(structure(manifest)))
    typer.echo("masks and weights agree")
