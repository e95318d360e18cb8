"""MLPruning step 1: head and row pruning of a fine-tuned encoder, distilled from its teacher.

Per training step:

1. the dense teacher (frozen, eval mode) runs on the batch: logits, hidden states and, when the
   attention term is weighted, attention probabilities;
2. the student runs with every prunable weight masked through its parametrization; masks come
   from the top-k binarizer over the unit scores with k = ceil(sigmoid(t) * N);
3. loss = alpha_ce * CE + alpha_distil * (logit KL + hidden MSE + attention MSE) + lambda * R,
   with R and lambda from the adaptive regularizer on the analytic remaining ratio r;
4. AdamW updates weights at ``learning_rate`` and scores/thresholds at ``mask_learning_rate``.

At the end the masks are fixed, baked into the weights (exact zeros, plain HF keys) and the
masked checkpoint is written (:mod:`pipeline.pruning.checkpoint`), with the structure summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlpruning.core.atomic import staging_dir, write_json
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json
from mlpruning.core.manifest import Manifest, write_manifest
from pipeline.adapters import geometry, layer_linears
from pipeline.batching import collate
from pipeline.config import PruneConfig
from pipeline.evaluate import METADATA_FILE, EvalResult, evaluate_encoded, read_metadata
from pipeline.finetune import load_task_data, param_groups, task_forward, versions
from pipeline.models import load_for_task, load_tokenizer, quiet_transformers, resolve_model
from pipeline.progress import TrainProgress
from pipeline.pruning.checkpoint import (
    MANIFEST_FILE,
    MASKS_FILE,
    SCORES_FILE,
    build_manifest,
    save_masks,
    save_scores,
)
from pipeline.pruning.distill import DistillWeights, distill_loss
from pipeline.pruning.masks import MaskScores, attach, detach_masks
from pipeline.pruning.regularizer import (
    RegTerm,
    adaptive_regularizer,
    counted_ratio,
    floor_ratio,
    remaining_ratio,
)
from pipeline.pruning.summary import write_summary
from pipeline.tasks import get_task
from pipeline.trainloop import EVAL_FILE, TrainLoop, resolve_device, wrap_ddp


class PrunableModel(nn.Module):
    """Student plus its mask scores, one module so DDP synchronises both."""

    def __init__(self, student: nn.Module, scores: MaskScores) -> None:
        super().__init__()
        self.student, self.scores = student, scores

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.student(**batch)


def check_teacher_task(teacher_dir: str, task: str) -> None:
    """The teacher must be fine-tuned on the task being pruned for."""
    trained_on = read_metadata(Path(teacher_dir)).get("task") if Path(teacher_dir).is_dir() else None
    if trained_on is not None and trained_on != task:
        raise UserError(
            f"teacher {teacher_dir} was fine-tuned on {trained_on}, not {task}: pass --task {trained_on}"
        )


def check_same_tokenizer(teacher_dir: str, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Distillation compares token by token: both models must tokenize identically."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise UserError(
            f"teacher {teacher_dir} and the student use different tokenizers: "
            "prune a student of the teacher's model family"
        )


class DistilledPruning(TrainLoop):
    """What both steps share: the distillation step, the regularizer, evaluation and the writer.

    A subclass loads ``teacher``, ``student``, ``tokenizer``, data and a mask module ``scores``
    (with ``scores``/``thresholds`` parameter dicts and ``freeze``/``unfreeze``), sets
    ``target_ratio`` (what ``ratio()`` is driven to), then calls :meth:`setup_training`.
    """

    cfg: Any
    student: nn.Module
    teacher: nn.Module
    scores: nn.Module
    target_ratio: float

    def ratio(self) -> torch.Tensor:
        """Differentiable ratio the regularizer drives to ``target_ratio``."""
        raise NotImplementedError

    def eval_ratios(self, masks: dict[str, torch.Tensor]) -> dict[str, float]:
        """Ratios counted from frozen masks, added to the eval metrics."""
        raise NotImplementedError

    def setup_training(self) -> None:
        cfg = self.cfg
        self.model = PrunableModel(self.student, self.scores).to(self.device)
        self.teacher.to(self.device)
        self.setup_loop(cfg.epochs)
        groups = param_groups(self.student, cfg.weight_decay)
        mask_lr = cfg.mask_learning_rate
        groups.append({"params": list(self.scores.scores.parameters()), "weight_decay": 0.0, "lr": mask_lr})
        # No momentum on thresholds: the one-sided regularizer stops pulling the moment r < r*,
        # and with beta1 = 0.9 Adam would carry every threshold ~10 steps past the target.
        thresholds = list(self.scores.thresholds.parameters())
        groups.append({"params": thresholds, "weight_decay": 0.0, "lr": mask_lr, "betas": (0.0, 0.999)})
        self.setup_optimizer(groups)
        self.ddp_model = wrap_ddp(self.model)
        self.last_reg: RegTerm | None = None

    def stateful(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def regularizer(self) -> RegTerm:
        cfg, target = self.cfg, self.target_ratio
        reg = adaptive_regularizer(self.ratio(), target, cfg.lambda_final, cfg.lambda_min)
        if reg.gap < cfg.settled_gap and target < 1:
            scale = cfg.lambda_settled / reg.lam if reg.lam else 0.0
            reg = RegTerm(reg.penalty * scale, reg.ratio, cfg.lambda_settled, reg.gap)
        return reg

    def train_step(self, indices: np.ndarray) -> tuple[float, int, str]:
        self.model.train()
        batch = collate(self.train, indices, self.device)
        need_attn = self.weights.attention > 0 and self.weights.alpha_distil > 0
        kwargs = {"output_hidden_states": self.weights.hidden > 0, "output_attentions": need_attn}
        with torch.no_grad():
            t_out = self.teacher(**batch, **kwargs)
        s_out, s_outputs, task_loss = task_forward(
            self.ddp_model, self.task, batch, self.train.labels[indices], **kwargs
        )
        t_outputs = {k: v.detach() for k, v in self.task.kind.tensors(t_out, self.task).items()}
        logit_term = self.task.kind.distill_loss(s_outputs, t_outputs, self.weights.temperature)
        dl = distill_loss(s_out, t_out, task_loss, logit_term, batch["attention_mask"], self.weights)
        reg = self.regularizer()
        (dl.total + reg.penalty).backward()
        self.step_optimizer()
        if self.cfg.ratio_floor:
            floor_ratio(list(self.scores.thresholds.parameters()), self.ratio, self.target_ratio)
        self.last_reg = reg
        parts = " ".join(f"{k} {v:.3f}" for k, v in dl.parts.items())
        extra = f"[{parts}]  r {reg.ratio:.3f}/{self.target_ratio:.3g}  λ {reg.lam:,.0f}"
        return float(dl.total.detach()), int(batch["attention_mask"].sum()), extra

    def evaluate(self) -> EvalResult:
        masks = self.scores.freeze()
        try:
            result = evaluate_encoded(self.student, self.task, self.dev, "dev")
        finally:
            self.scores.unfreeze()
        return EvalResult(
            result.task,
            result.split,
            {**result.metrics, **self.eval_ratios(masks)},
            result.num_examples,
            result.seconds,
            result.outputs,
        )

    def run_record(self) -> dict[str, Any]:
        """The manifest fields both steps record about the run itself."""
        return {
            "config": self.cfg.to_dict(),
            "steps": self.state.step,
            "wall_time_s": round(self.state.elapsed, 1),
            "history": self.state.history,
            "versions": versions(),
        }

    def write_checkpoint(
        self, masks: dict[str, torch.Tensor], manifest: Manifest, evaluation: dict[str, Any]
    ) -> None:
        """Masks baked in (``detach_masks`` done): write the folder, ``eval.json`` last."""
        geo = geometry(self.student)
        with staging_dir(self.out) as tmp, quiet_transformers():
            self.student.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_masks(tmp / MASKS_FILE, masks, geo)
            if isinstance(self.scores, MaskScores):  # step 2 revives rows by these
                save_scores(tmp / SCORES_FILE, dict(self.scores.scores), geo)
            write_manifest(tmp / MANIFEST_FILE, manifest, "checkpoint")
            write_json(
                tmp / METADATA_FILE, {"task": self.task.name, "kind": "masked", "config": self.cfg.to_dict()}
            )
            write_summary(manifest, tmp)
        write_json(self.out / EVAL_FILE, evaluation)


class Pruner(DistilledPruning):
    """One step-1 pruning run into ``out``."""

    def __init__(
        self, cfg: PruneConfig, out: Path, progress: TrainProgress | None = None, device: str = "auto"
    ) -> None:
        self.cfg, self.out = cfg, out
        self.device = resolve_device(device)
        self.task = get_task(cfg.task)
        self.progress = progress or TrainProgress(enabled=False)
        student_src = cfg.student or cfg.teacher
        check_teacher_task(cfg.teacher, self.task.name)
        self.tokenizer = load_tokenizer(student_src)
        check_same_tokenizer(cfg.teacher, self.tokenizer, load_tokenizer(cfg.teacher))
        self.train, self.dev = load_task_data(cfg, self.tokenizer)
        self.weights = DistillWeights(
            cfg.alpha_distil, cfg.alpha_ce, cfg.temperature, cfg.hidden_weight, cfg.attention_weight
        )
        attn = "eager" if cfg.attention_weight > 0 and cfg.alpha_distil > 0 else None
        self.teacher = (
            load_for_task(cfg.teacher, self.task, attn_implementation=attn).eval().requires_grad_(False)
        )
        torch.manual_seed(cfg.seed)
        self.student = load_for_task(student_src, self.task, attn_implementation=attn)
        if cfg.freeze_embeddings:
            self.student.base_model.embeddings.requires_grad_(False)
        self.scores = MaskScores(geometry(self.student), cfg.threshold_init, cfg.score_init)
        attach(layer_linears(self.student), self.scores)
        self.target_ratio = cfg.target
        self.setup_training()

    def headline(self) -> str:
        student = self.cfg.student or self.cfg.teacher
        return f"pruning {student} on {self.cfg.task} to r* = {self.cfg.target}: {self.total_steps} steps"

    def ratio(self) -> torch.Tensor:
        return remaining_ratio(self.scores, self.cfg.threshold_grad)

    def eval_ratios(self, masks: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"remaining_ratio": counted_ratio(masks, self.scores.geo)}

    def finalize(self, result: EvalResult) -> None:
        masks = self.scores.freeze()
        detach_masks(layer_linears(self.student))
        extra = {
            "task": self.task.name,
            "target": self.cfg.target,
            "teacher": self.cfg.teacher,
            "base_model": base_model_of(self.cfg.teacher),
            "student_init": self.cfg.student or self.cfg.teacher,
            **self.run_record(),
        }
        manifest = build_manifest(self.student, masks, extra)
        evaluation = {
            **result.to_json(),
            "remaining_ratio": manifest["remaining_ratio"],
            "target": self.cfg.target,
            "teacher_metrics": teacher_eval(self.cfg.teacher),
            "wall_time_s": extra["wall_time_s"],
        }
        self.write_checkpoint(masks, manifest, evaluation)


def base_model_of(teacher: str) -> str:
    meta = read_metadata(Path(resolve_model(teacher))) if Path(teacher).is_dir() else {}
    return meta.get("base_model", teacher)


def teacher_eval(teacher: str) -> dict[str, float] | None:
    return (read_json(Path(teacher) / EVAL_FILE, "re-run mlpruning eval on the teacher") or {}).get("metrics")
