"""The config of `mlpruning run`: one TOML file, one table per stage, validated up front.

    [run]        task, threads (torch and ORT threads of the training stages), teacher (an
                 existing fine-tuned checkpoint to reuse instead of fine-tuning)
    [finetune]   FinetuneConfig fields (task and model default to [run]'s / MiniLM)
    [step1]      PruneConfig fields except task and teacher (the run's teacher)
    [step2]      optional: BlockPruneConfig fields except source (the run's step 1)
    [export]     exporter, opset
    [optimize]   OptimizeOptions fields: scatter_rows, block_sparse, block, ort_fusion
    [quantize]   optional: QuantizeOptions fields (mode, search, calibration_examples, ...); adds
                 an INT8 copy of every variant, dense included (``<variant>-int8``)
    [verify]     atol, rtol, min_agreement, max_metric_drop; a [verify.<variant>] sub-table
                 sets that variant's own (e.g. [verify.step2] max_metric_drop = 0.01)
    [bench]      batches, seqs, threads, rounds, iters

Every table is turned into the same frozen config class the single-stage command uses, so
a bad value fails here, before any stage runs, with the table named in the message. Each
stage's part of the config (``stage_inputs``) feeds that stage's input hash in the runner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import run_layout as L
from deploy.bench import BenchConfig
from deploy.quantize_parts import QuantizeOptions
from deploy.verify import Tolerance
from graph_passes.registry import OptimizeOptions
from mlpruning.core.contract import DEFAULT_VARIANTS, Variant
from mlpruning.core.errors import UserError
from pipeline.config import BlockPruneConfig, FinetuneConfig, PruneConfig, from_mapping, load_toml
from pipeline.export import EXPORTERS

PRUNING_TABLES = ("step1", "step2")  # each makes the variant of its name
RUN_PATHS = ("teacher", "source")  # a pruning step's folders inside the run (hashed by name)
TABLES = ("run", "finetune", *PRUNING_TABLES, "export", "optimize", "quantize", "verify", "bench")


@dataclass(frozen=True)
class ExportSettings:
    exporter: str = "torchscript"
    opset: int = 17

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        if not 14 <= self.opset <= 23:
            raise ValueError(f"opset must be in [14, 23], got {self.opset}")


@dataclass(frozen=True)
class RunConfig:
    """The whole pipeline of one run folder."""

    task: str
    threads: int | None
    teacher: str | None  # reuse this fine-tuned checkpoint; None: fine-tune one
    finetune: FinetuneConfig
    step1: PruneConfig
    step2: BlockPruneConfig | None
    export: ExportSettings
    optimize: OptimizeOptions
    verify: Tolerance
    bench: BenchConfig
    quantize: QuantizeOptions | None = None
    # the models the run deploys, baseline first: the teacher, then one per pruning table
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    # [verify.<variant>] sub-tables: that variant's bounds, over the [verify] ones
    verify_by_variant: tuple[tuple[str, Tolerance], ...] = ()

    def verify_for(self, variant: str) -> Tolerance:
        return dict(self.verify_by_variant).get(variant, self.verify)

    @property
    def baseline(self) -> Variant:
        return next(v for v in self.variants if v.baseline)

    @property
    def pruned(self) -> tuple[Variant, ...]:
        return tuple(v for v in self.variants if not v.baseline and not v.int8_of)

    @property
    def int8(self) -> tuple[Variant, ...]:
        return tuple(v for v in self.variants if v.int8_of)

    def source_of(self, variant: Variant) -> Variant:
        """The fp32 variant an INT8 copy was made from."""
        return next(v for v in self.variants if v.name == variant.int8_of)

    def stage_inputs(self, stage: str, legacy: bool = False) -> dict[str, Any]:
        """The config part a stage depends on (``export:step1`` -> the export table). A pruning
        step's teacher or source folder counts by its name in the run: its content is hashed
        as the stage's dependency, so a run folder moved or copied elsewhere is not retrained.
        ``legacy``: those paths in full, as runs written before this rule hashed them."""
        table, _, variant = stage.partition(":")
        if table == "teacher":
            return {"teacher": self.teacher} if self.teacher else {"finetune": _plain(self.finetune)}
        if table == "verify":
            # the resolved bounds: a config spelling out the precision's defaults hashes the same
            int8 = any(v.name == variant and v.int8_of for v in self.variants)
            return {table: _plain(self.verify_for(variant).resolved(int8))}
        values = _plain(getattr(self, table))
        if table in PRUNING_TABLES and not legacy:
            values = {**values, **{k: Path(values[k]).name for k in RUN_PATHS if values.get(k)}}
        return {table: values}


def _plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise UserError(f"[{name}] must be a table in the run config")
    return dict(value)


@dataclass(frozen=True)
class RunSettings:
    """The [run] table; its types are checked by ``from_mapping`` like every other table."""

    task: str = "sst2"
    threads: int | None = None
    teacher: str | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {self.threads}")


def _run_table(data: dict[str, Any], path: Path) -> RunSettings:
    run = from_mapping(RunSettings, _table(data, "run"), f"{path} [run]")
    if run.teacher is not None and not (Path(run.teacher) / "config.json").is_file():
        raise UserError(f"{path} [run]: teacher {run.teacher} is not a checkpoint folder: fix the path")
    return run


def load_run_config(path: Path, run_dir: Path) -> RunConfig:
    """Read and validate ``path``; ``run_dir`` is where the stages will write (it names their inputs)."""
    data = load_toml(path, "__whole_file__")
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise UserError(f"{path}: unknown table(s) {', '.join(unknown)}; known: {', '.join(TABLES)}")
    run = _run_table(data, path)
    task, threads, teacher = run.task, run.threads, run.teacher
    src = str(path)
    finetune = from_mapping(FinetuneConfig, {"task": task, **_table(data, "finetune")}, f"{src} [finetune]")
    if finetune.task != from_mapping(FinetuneConfig, {"task": task}, src).task:
        raise UserError(f"{path} [finetune]: task differs from [run] task {task}: set it in [run] only")
    for table in PRUNING_TABLES:
        given = table in data or table == "step1"  # step 1 is required, step 2 optional
        if given and "target" not in _table(data, table):
            raise UserError(f"{path} [{table}]: set target, the share of encoder weights to keep (e.g. 0.5)")
    dense = DEFAULT_VARIANTS[0]
    variants = (dense, *(Variant(t, t) for t in PRUNING_TABLES if t in data or t == "step1"))
    quantize = None
    if "quantize" in data:
        values = _table(data, "quantize")
        if "task" in values:
            raise UserError(f"{path} [quantize]: task is the run's: set it in [run] only")
        quantize = from_mapping(QuantizeOptions, {**values, "task": finetune.task}, f"{path} [quantize]")
        variants = (*variants, *(v.int8_copy() for v in variants))
    teacher_dir = str(L.checkpoint_dir(run_dir, dense))
    step1_values = {**_table(data, "step1"), "task": finetune.task, "teacher": teacher_dir}
    step1 = from_mapping(PruneConfig, step1_values, f"{src} [step1]")
    step2 = None
    if "step2" in data:
        step2_values = {**_table(data, "step2"), "source": str(L.checkpoint_dir(run_dir, variants[1]))}
        step2 = from_mapping(BlockPruneConfig, step2_values, f"{src} [step2]")
    verify, by_variant = _verify(data, src, variants)
    return RunConfig(
        task=finetune.task,
        threads=threads,
        teacher=teacher,
        finetune=finetune,
        step1=step1,
        step2=step2,
        export=from_mapping(ExportSettings, _table(data, "export"), f"{src} [export]"),
        optimize=from_mapping(OptimizeOptions, _table(data, "optimize"), f"{src} [optimize]"),
        verify=verify,
        bench=_bench(_table(data, "bench"), src),
        variants=variants,
        verify_by_variant=by_variant,
        quantize=quantize,
    )


def _verify(
    data: dict[str, Any], src: str, variants: tuple[Variant, ...]
) -> tuple[Tolerance, tuple[tuple[str, Tolerance], ...]]:
    """[verify] and its per-variant sub-tables ([verify.step2]: that variant's bounds over [verify]'s)."""
    table = _table(data, "verify")
    subs = {k: table.pop(k) for k in [k for k, v in table.items() if isinstance(v, dict)]}
    names = [v.name for v in variants]
    unknown = sorted(set(subs) - set(names))
    if unknown:
        known = ", ".join(names)
        raise UserError(f"{src} [verify.{unknown[0]}]: no such variant in this run; variants: {known}")
    base = from_mapping(Tolerance, table, f"{src} [verify]")
    merged = tuple(
        (name, from_mapping(Tolerance, {**table, **subs[name]}, f"{src} [verify.{name}]"))
        for name in names
        if name in subs
    )
    return base, merged


def _bench(values: dict[str, Any], src: str) -> BenchConfig:
    # from_mapping checks the lists' items and turns them into tuples (the field type)
    values = {"batches": (1,), "seqs": (128,), **values}
    return from_mapping(BenchConfig, values, f"{src} [bench]")
