"""MLPruning step 2: block pruning of a step-1 checkpoint, distilled from that checkpoint.

Start. The step-1 masked checkpoint is the teacher (frozen; its weights are zero wherever its
masks are off, which ``load_masked`` verifies) and the student's starting point. The student's
FFN rows and O / FFN-out output rows are rounded up to whole blocks, reviving the next-best
rows (:mod:`pipeline.pruning.revive`); then every prunable matrix gets block scores and one
threshold (:mod:`pipeline.pruning.block_masks`), in the compact coordinates the ONNX strip
passes leave (:mod:`pipeline.pruning.blocks`).

Target. With N the encoder's prunable weights, K1 the weights step 1 kept (before revival) and
K the weights the block masks keep, the regularizer of step 1 drives

    rho = K / K1   to   rho* = target              (target_of = "step1")
                         rho* = target * N / K1     (target_of = "original")

so the same adaptive lambda schedule applies (rho starts at ~1). Reported: rho and r = K / N.

Each step is step 1's (:class:`pipeline.pruning.pruner.DistilledPruning`): distillation from the
teacher plus lambda * R. At the end the block masks are frozen and baked into the weights, and
the checkpoint holds the revived unit masks, the block masks and a format-2 manifest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from mlpruning.core.errors import UserError
from pipeline.adapters import Geometry, geometry, layer_linears
from pipeline.config import BlockPruneConfig
from pipeline.evaluate import EvalResult
from pipeline.finetune import load_task_data
from pipeline.models import load_for_task, load_tokenizer, resolve_model
from pipeline.progress import TrainProgress
from pipeline.pruning.block_masks import BlockScores, attach_blocks, build_indices
from pipeline.pruning.blocks import check_block_fits, kept_weights
from pipeline.pruning.checkpoint import (
    MANIFEST_FILE,
    build_manifest,
    load_masked,
    read_manifest,
    read_scores,
)
from pipeline.pruning.distill import DistillWeights
from pipeline.pruning.masks import detach_masks
from pipeline.pruning.pruner import DistilledPruning, teacher_eval
from pipeline.pruning.regularizer import counted_ratio, layer_weights
from pipeline.pruning.revive import copy_revived, magnitude_ranking, revive
from pipeline.tasks import get_task
from pipeline.trainloop import resolve_device


def read_step1(source: Path) -> dict[str, Any]:
    """The manifest of a step-1 checkpoint, or a UserError saying what ``source`` is instead."""
    if not source.is_dir():
        raise UserError(f"step-1 checkpoint {source} does not exist: pass the output of mlpruning prune")
    if not (source / MANIFEST_FILE).is_file():
        raise UserError(
            f"{source} is not a step-1 checkpoint (no {MANIFEST_FILE}): pass the output of "
            "mlpruning prune --step head_row as --from"
        )
    manifest = read_manifest(source)
    if manifest["step"] != "head_row":
        raise UserError(
            f"{source} is a {manifest['step']}-pruned checkpoint, not a step-1 one: pass the output "
            "of mlpruning prune --step head_row as --from"
        )
    return manifest


class BlockPruner(DistilledPruning):
    """One step-2 (block) pruning run into ``out``."""

    def __init__(
        self, cfg: BlockPruneConfig, out: Path, progress: TrainProgress | None = None, device: str = "auto"
    ) -> None:
        self.out, self.device = out, resolve_device(device)
        self.progress = progress or TrainProgress(enabled=False)
        self.source = Path(cfg.source)
        self.step1 = read_step1(self.source)
        task = self.step1["task"]
        if cfg.task is not None and cfg.task != task:
            raise UserError(f"{self.source} was pruned for {task}, not {cfg.task}: pass --task {task}")
        self.cfg = cfg = dataclasses.replace(cfg, task=task)  # resolved the same way on resume
        self.task, self.block = get_task(task), cfg.block_shape
        check_block_fits(Geometry(**self.step1["geometry"]), self.block)
        self._check_target(self.step1["remaining_ratio"])  # before the slow loads
        self.tokenizer = load_tokenizer(str(self.source))
        self.train, self.dev = load_task_data(cfg, self.tokenizer)
        self.weights = DistillWeights(
            cfg.alpha_distil, cfg.alpha_ce, cfg.temperature, cfg.hidden_weight, cfg.attention_weight
        )
        attn = "eager" if cfg.attention_weight > 0 and cfg.alpha_distil > 0 else None
        teacher, units1, _ = load_masked(self.source, attn_implementation=attn)
        self.teacher = teacher.eval().requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.student = load_for_task(str(self.source), self.task, attn_implementation=attn)
        if cfg.freeze_embeddings:
            self.student.base_model.embeddings.requires_grad_(False)
        self.geo = geometry(self.student)
        self.units, self.revival = self._revive(units1)
        indices = build_indices(self.units, self.geo, self.block)
        self.scores = BlockScores(
            indices, cfg.threshold_init, cfg.score_init, cfg.row_balanced, cfg.threshold_grad
        )
        attach_blocks(layer_linears(self.student), self.scores, indices)
        self.total = self.geo.num_layers * layer_weights(self.geo)
        self.step1_ratio = counted_ratio(units1, self.geo)
        self.step1_kept = self.step1_ratio * self.total
        self.target_ratio = self._target_fraction()
        self.setup_training()

    def _revive(self, units1: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Round step-1 rows up to whole blocks; revived rows get their pre-step-1 weights."""
        unranked = {k: torch.zeros(v.shape) for k, v in units1.items()}
        if not revive(units1, self.geo, self.block, unranked)[1]:
            return units1, {"ranked_by": None, "weights_from": None, "revived": {}}
        origin = self.cfg.revive_from or self.step1.get("student_init") or self.step1["teacher"]
        try:
            resolve_model(origin)
        except UserError:
            raise UserError(
                f"revived rows take their weights from {origin} (the model step 1 started from), "
                "which does not exist: set revive_from in the config or pass --revive-from"
            ) from None
        source = load_for_task(origin, self.task)
        if geometry(source) != self.geo:
            raise UserError(
                f"{origin} has another shape than {self.source}: pass the model step 1 started from"
            )
        scores1 = read_scores(self.source, self.geo)
        ranking = scores1 or magnitude_ranking(layer_linears(source), units1, self.geo)
        units, revived = revive(units1, self.geo, self.block, ranking)
        copy_revived(layer_linears(self.student), layer_linears(source), revived)
        ranked_by = "step1_scores" if scores1 else "source_weight_magnitude"
        return units, {"ranked_by": ranked_by, "weights_from": origin, "revived": revived}

    def _check_target(self, step1_ratio: float) -> None:
        cfg = self.cfg
        if cfg.target_of == "original" and cfg.target > step1_ratio:
            raise UserError(
                f"--target {cfg.target} of the original is more than step 1 kept ({step1_ratio:.4f}): "
                f"pass a target below {step1_ratio:.4f} or --target-of step1"
            )

    def _target_fraction(self) -> float:
        if self.cfg.target_of == "step1":
            return self.cfg.target
        self._check_target(self.step1_ratio)
        return self.cfg.target * self.total / self.step1_kept

    def headline(self) -> str:
        cfg, (bo, bi) = self.cfg, self.block
        kind = "row-balanced " if cfg.row_balanced else ""
        r_orig = self.target_ratio * self.step1_ratio
        return (
            f"block pruning {self.source} ({kind}{bo}x{bi} blocks) on {cfg.task} to {self.target_ratio:.3f} "
            f"of step 1 (r* = {r_orig:.3f} of the original): {self.total_steps} steps"
        )

    def ratio(self) -> torch.Tensor:
        return self.scores.kept() / self.step1_kept

    def eval_ratios(self, masks: dict[str, torch.Tensor]) -> dict[str, float]:
        kept = sum(kept_weights({**self.units, **masks}, self.geo).values())
        return {"remaining_ratio": kept / self.total, "remaining_ratio_of_step1": kept / self.step1_kept}

    def finalize(self, result: EvalResult) -> None:
        masks = {**self.units, **self.scores.freeze()}
        detach_masks(layer_linears(self.student))
        ratios = self.eval_ratios(masks)
        step1 = self.step1
        extra = {
            "step": "block",
            "task": self.task.name,
            "target": self.cfg.target,
            "target_of": self.cfg.target_of,
            "target_ratio": self.target_ratio * self.step1_ratio,
            "block": list(self.block),
            "row_balanced": self.cfg.row_balanced,
            "teacher": str(self.source),
            "base_model": step1.get("base_model"),
            "student_init": str(self.source),
            "step1": {
                "source": str(self.source),
                "remaining_ratio": self.step1_ratio,
                "target": step1.get("target"),
                "teacher": step1.get("teacher"),
            },
            "revival": self.revival,
            "remaining_ratio_of_step1": ratios["remaining_ratio_of_step1"],
            **self.run_record(),
        }
        manifest = build_manifest(self.student, masks, extra)
        evaluation = {
            **result.to_json(),
            **ratios,
            "target": self.cfg.target,
            "target_of": self.cfg.target_of,
            "teacher_metrics": teacher_eval(str(self.source)),
            "dense_teacher_metrics": teacher_eval(step1["teacher"]) if step1.get("teacher") else None,
            "wall_time_s": extra["wall_time_s"],
        }
        self.write_checkpoint(masks, manifest, evaluation)
