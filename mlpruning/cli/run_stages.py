"""The stages of `mlpruning run`, each a call into the library the single-stage commands use.

See :mod:`mlpruning.cli.runner` for skipping and restarting. Every action returns a small JSON
result that ``run.json`` keeps (a metric, a pass/fail); the full outputs are the stage's files.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from deploy import run_layout as L
from mlpruning.cli.run_config import RunConfig
from mlpruning.cli.runner import Stage
from mlpruning.core.atomic import write_json
from mlpruning.core.contract import QUANTIZE_REPORT, Variant


class StageActions:
    """The actions of one run: ``cfg`` written into ``run``, training on ``device``."""

    def __init__(self, cfg: RunConfig, run: Path, device: str, progress: Any) -> None:
        self.cfg, self.run, self.device, self.progress = cfg, run, device, progress

    def link_teacher(self, resume: bool) -> dict[str, Any]:
        target = Path(self.cfg.teacher or "").resolve()
        link = L.checkpoint_dir(self.run, self.cfg.baseline)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
        return {"linked": str(target)}

    def finetune(self, resume: bool) -> dict[str, Any] | None:
        from pipeline.finetune import Finetuner

        out = L.checkpoint_dir(self.run, self.cfg.baseline)
        result = Finetuner(self.cfg.finetune, out, self.progress, device=self.device).run(resume=resume)
        return result.metrics if result else None

    def prune(self, variant: Variant, resume: bool) -> dict[str, Any] | None:
        from pipeline.pruning.block_pruner import BlockPruner
        from pipeline.pruning.pruner import Pruner

        out = L.checkpoint_dir(self.run, variant)
        if variant.name == "step1":  # the method's two steps: heads and rows, then blocks
            runner: Any = Pruner(self.cfg.step1, out, self.progress, device=self.device)
        else:
            assert self.cfg.step2 is not None
            runner = BlockPruner(self.cfg.step2, out, self.progress, device=self.device)
        result = runner.run(resume=resume)
        return result.metrics if result else None

    def export(self, variant: Variant, resume: bool) -> dict[str, Any]:
        from pipeline.export import export_onnx

        settings = self.cfg.export
        src, out = L.checkpoint_dir(self.run, variant), L.onnx_dir(self.run, variant)
        report = export_onnx(src, out, settings.opset, settings.exporter)
        return {"parity_max_abs_diff": report["parity_max_abs_diff"]}

    def optimize(self, variant: Variant, resume: bool) -> dict[str, Any]:
        from graph_passes.optimize import optimize

        s = self.cfg.optimize
        src, out = L.onnx_dir(self.run, variant), L.opt_dir(self.run, variant)
        report = optimize(src, out, s)
        return {"passes": [p.get("name") for p in report["passes"]]}

    def quantize(self, variant: Variant, resume: bool) -> dict[str, Any]:
        from deploy.quantize import quantize

        assert self.cfg.quantize is not None
        src = L.model_dir(self.run, self.cfg.source_of(variant))
        report = quantize(src, L.quant_dir(self.run, variant), self.cfg.quantize, self._data_dir())
        return {"chosen": report["chosen"], "kept_fp32": list(report["kept_fp32"])}

    def _data_dir(self) -> Path | None:
        return Path(self.cfg.finetune.data_dir) if self.cfg.finetune.data_dir else None

    def verify(self, variant: Variant, resume: bool) -> dict[str, Any]:
        from deploy.verify import verify

        fp32 = self.cfg.source_of(variant) if variant.int8_of else variant
        stages = [L.onnx_dir(self.run, fp32)]
        if not variant.baseline:
            stages.append(L.model_dir(self.run, variant))
        tol = self.cfg.verify_for(variant.name)
        report = verify(stages, L.checkpoint_dir(self.run, variant), self.cfg.task, self._data_dir(), tol)
        write_json(L.verify_report(self.run, variant), report)
        return {"passed": report["passed"], "onnx": report["metric"]["onnx"]}

    def bench(self, variant: Variant, resume: bool) -> dict[str, Any]:
        from deploy.bench import bench
        from deploy.summary import point_key

        baseline = L.onnx_dir(self.run, self.cfg.baseline)
        report = bench(L.model_dir(self.run, variant), baseline, self.cfg.bench)
        write_json(L.bench_report(self.run, variant), report)
        return {point_key(p["batch"], p["seq"]): p["speedup_median"] for p in report["points"]}


def _deploy_stage(v: Variant) -> str:
    """The stage that writes a variant's deployable model."""
    kind = "export" if v.baseline else ("quantize" if v.int8_of else "optimize")
    return f"{kind}:{v.name}"


def build_stages(actions: StageActions) -> list[Stage]:
    """Every stage of the configured pipeline, in order."""
    cfg, run = actions.cfg, actions.run
    dense, pruned = cfg.baseline, cfg.pruned
    teacher = L.checkpoint_dir(run, dense)
    if cfg.teacher:
        stages = [Stage(dense.checkpoint, teacher, teacher / "config.json", (), actions.link_teacher)]
    else:
        stages = [Stage(dense.checkpoint, teacher, teacher / "eval.json", (), actions.finetune, trains=True)]
    upstream = dense.checkpoint
    for v in pruned:  # each step prunes the one before it (step 2 the step-1 checkpoint)
        out = L.checkpoint_dir(run, v)
        prune = partial(actions.prune, v)
        stages.append(Stage(v.checkpoint, out, out / "eval.json", (upstream,), prune, trains=True))
        upstream = v.checkpoint
    for v in (dense, *pruned):
        out = L.onnx_dir(run, v)
        export = partial(actions.export, v)
        stages.append(Stage(f"export:{v.name}", out, out / "export.json", (v.checkpoint,), export))
    for v in pruned:
        out = L.opt_dir(run, v)
        optimize, deps = partial(actions.optimize, v), (f"export:{v.name}",)
        stages.append(Stage(f"optimize:{v.name}", out, out / "optimize.json", deps, optimize))
    for v in cfg.int8:
        deps = (_deploy_stage(cfg.source_of(v)),)
        out, quantize = L.quant_dir(run, v), partial(actions.quantize, v)
        stages.append(Stage(f"quantize:{v.name}", out, out / QUANTIZE_REPORT, deps, quantize, may_fail=True))
    for v in cfg.variants:
        report = L.verify_report(run, v)
        fp32 = cfg.source_of(v) if v.int8_of else v
        model = _deploy_stage(v)
        deps = (model, f"export:{fp32.name}", v.checkpoint)
        stages.append(Stage(f"verify:{v.name}", report, report, deps, partial(actions.verify, v)))
    for v in (*pruned, *cfg.int8):
        report = L.bench_report(run, v)
        deps = (_deploy_stage(v), f"export:{dense.name}")
        stages.append(Stage(f"bench:{v.name}", report, report, deps, partial(actions.bench, v)))
    return stages
