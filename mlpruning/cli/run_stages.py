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


class StageActions:
    """The actions of one run: ``cfg`` written into ``run``, training on ``device``."""

    def __init__(self, cfg: RunConfig, run: Path, device: str, progress: Any) -> None:
        self.cfg, self.run, self.device, self.progress = cfg, run, device, progress

    def link_teacher(self, resume: bool) -> dict[str, Any]:
        target = Path(self.cfg.teacher or "").resolve()
        link = L.checkpoint_dir(self.run, "dense")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
        return {"linked": str(target)}

    def finetune(self, resume: bool) -> dict[str, Any] | None:
        from pipeline.finetune import Finetuner

        out = L.checkpoint_dir(self.run, "dense")
        result = Finetuner(self.cfg.finetune, out, self.progress, device=self.device).run(resume=resume)
        return result.metrics if result else None

    def prune(self, variant: str, resume: bool) -> dict[str, Any] | None:
        from pipeline.pruning.block_pruner import BlockPruner
        from pipeline.pruning.pruner import Pruner

        out = L.checkpoint_dir(self.run, variant)
        if variant == "step1":
            runner: Any = Pruner(self.cfg.step1, out, self.progress, device=self.device)
        else:
            assert self.cfg.step2 is not None
            runner = BlockPruner(self.cfg.step2, out, self.progress, device=self.device)
        result = runner.run(resume=resume)
        return result.metrics if result else None

    def export(self, variant: str, resume: bool) -> dict[str, Any]:
        from pipeline.export import export_onnx

        settings = self.cfg.export
        src, out = L.checkpoint_dir(self.run, variant), L.onnx_dir(self.run, variant)
        report = export_onnx(src, out, settings.opset, settings.exporter)
        return {"parity_max_abs_diff": report["parity_max_abs_diff"]}

    def optimize(self, variant: str, resume: bool) -> dict[str, Any]:
        from graph_passes.optimize import optimize

        s = self.cfg.optimize
        src, out = L.onnx_dir(self.run, variant), L.opt_dir(self.run, variant)
        report = optimize(src, out, s)
        return {"passes": [p.get("name") for p in report["passes"]]}

    def verify(self, variant: str, resume: bool) -> dict[str, Any]:
        from deploy.verify import verify

        stages = [L.onnx_dir(self.run, variant)]
        if variant != "dense":
            stages.append(L.opt_dir(self.run, variant))
        data_dir = Path(self.cfg.finetune.data_dir) if self.cfg.finetune.data_dir else None
        report = verify(stages, L.checkpoint_dir(self.run, variant), self.cfg.task, data_dir, self.cfg.verify)
        write_json(L.verify_report(self.run, variant), report)
        return {"passed": report["passed"], "onnx": report["metric"]["onnx"]}

    def bench(self, variant: str, resume: bool) -> dict[str, Any]:
        from deploy.bench import bench
        from deploy.summary import point_key

        report = bench(L.opt_dir(self.run, variant), L.onnx_dir(self.run, "dense"), self.cfg.bench)
        write_json(L.bench_report(self.run, variant), report)
        return {point_key(p["batch"], p["seq"]): p["speedup_median"] for p in report["points"]}


def build_stages(actions: StageActions) -> list[Stage]:
    """Every stage of the configured pipeline, in order."""
    cfg, run = actions.cfg, actions.run
    pruned = ["step1", *(["step2"] if cfg.step2 else [])]
    teacher = L.checkpoint_dir(run, "dense")
    if cfg.teacher:
        stages = [Stage("teacher", teacher, teacher / "config.json", (), actions.link_teacher)]
    else:
        stages = [Stage("teacher", teacher, teacher / "eval.json", (), actions.finetune, trains=True)]
    upstream = {"step1": "teacher", "step2": "step1"}
    for v in pruned:
        out = L.checkpoint_dir(run, v)
        action = partial(actions.prune, v)
        stages.append(Stage(v, out, out / "eval.json", (upstream[v],), action, trains=True))
    for v in ["dense", *pruned]:
        out, ckpt = L.onnx_dir(run, v), "teacher" if v == "dense" else v
        stages.append(Stage(f"export:{v}", out, out / "export.json", (ckpt,), partial(actions.export, v)))
    for v in pruned:
        out = L.opt_dir(run, v)
        deps = (f"export:{v}",)
        stages.append(Stage(f"optimize:{v}", out, out / "optimize.json", deps, partial(actions.optimize, v)))
    for v in ["dense", *pruned]:
        report = L.verify_report(run, v)
        model = "export:dense" if v == "dense" else f"optimize:{v}"
        deps = (model, f"export:{v}", "teacher" if v == "dense" else v)
        stages.append(Stage(f"verify:{v}", report, report, deps, partial(actions.verify, v)))
    for v in pruned:
        report = L.bench_report(run, v)
        deps = (f"optimize:{v}", "export:dense")
        stages.append(Stage(f"bench:{v}", report, report, deps, partial(actions.bench, v)))
    return stages
