"""Knowledge distillation from the dense teacher (MLPruning's recipe).

    loss = alpha_distil * (L_logit + L_hidden + L_attn) + alpha_ce * L_task

- L_logit: the task kind's output-matching term (:mod:`pipeline.kinds`); for classification
  T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean; for a regression head the MSE between
  student and teacher scores.
- L_hidden = sum over hidden states (embeddings output and every layer) of the mean squared
  error between student and teacher, on non-padded tokens only.
- L_attn = sum over layers of the mean squared error between attention probabilities, over
  query positions that are real tokens (padded keys already carry ~0 probability on both sides).

Student and teacher have the same depth here (pruning removes width, not layers), so hidden
state i is matched to hidden state i. Attention probabilities need eager attention (SDPA does
not return them); the pruner loads both models with ``attn_implementation="eager"`` when the
attention term has a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DistillWeights:
    alpha_distil: float = 0.9
    alpha_ce: float = 0.1
    temperature: float = 2.0
    hidden: float = 1.0
    attention: float = 1.0

    def __post_init__(self) -> None:
        for name in ("alpha_distil", "alpha_ce", "hidden", "attention"):
            if getattr(self, name) < 0:
                raise ValueError(f"distillation weight {name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class DistillLoss:
    total: torch.Tensor
    parts: dict[str, float]


def hidden_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor
) -> torch.Tensor:
    keep = mask.bool()
    return sum(F.mse_loss(s[keep], t[keep]) for s, t in zip(student, teacher, strict=True))


def attention_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor
) -> torch.Tensor:
    keep = mask.bool()  # [B, L] query positions
    return sum(
        F.mse_loss(s.permute(0, 2, 1, 3)[keep], t.permute(0, 2, 1, 3)[keep])
        for s, t in zip(student, teacher, strict=True)
    )


def distill_loss(
    student_out: Any,
    teacher_out: Any,
    task_loss: torch.Tensor,
    output_loss: torch.Tensor,
    mask: torch.Tensor,
    w: DistillWeights,
) -> DistillLoss:
    """Combine the distillation terms with the task loss; ``parts`` are for the progress display.

    ``output_loss`` is the task kind's output-matching term (L_logit for the GLUE kinds); the
    hidden-state and attention terms read the transformers outputs of both models.
    """
    parts = {"task": task_loss}
    if w.alpha_distil > 0:
        parts["logit"] = output_loss
        if w.hidden > 0:
            parts["hidden"] = w.hidden * hidden_loss(
                student_out.hidden_states, teacher_out.hidden_states, mask
            )
        if w.attention > 0:
            parts["attn"] = w.attention * attention_loss(student_out.attentions, teacher_out.attentions, mask)
    distil = sum(v for k, v in parts.items() if k != "task")
    total = w.alpha_ce * task_loss + (w.alpha_distil * distil if w.alpha_distil > 0 else 0.0)
    return DistillLoss(total, {k: float(v.detach()) for k, v in parts.items()})
