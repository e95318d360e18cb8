"""Dense fine-tuning of the teacher, resumable and interruption-safe.

Optimisation is the usual BERT recipe: AdamW (no decay on biases and LayerNorm), linear warm-up
over ``warmup_ratio`` of the steps then linear decay to 0, gradient clipping. Batches, resume
state, signal handling and DDP come from :class:`pipeline.trainloop.TrainLoop`.

Outputs in OUT: a Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer
files), ``mlpruning.json`` (task, config, base model, versions, wall time) and ``eval.json``
(dev metrics), written last, which marks the run as complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlpruning import __version__
from mlpruning.core.atomic import staging_dir, write_json
from pipeline.batching import Encoded, collate, encode
from pipeline.config import FinetuneConfig
from pipeline.evaluate import METADATA_FILE, EvalResult, evaluate_encoded
from pipeline.models import load_for_task, load_tokenizer, quiet_transformers, resolve_model
from pipeline.progress import TrainProgress
from pipeline.tasks import TaskSpec, get_task, load_split
from pipeline.trainloop import EVAL_FILE, TrainLoop, resolve_device, wrap_ddp


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_task_data(cfg: Any, tokenizer: Any) -> tuple[Encoded, Encoded]:
    """Encoded train (optionally a seeded subset) and dev splits of ``cfg.task``."""
    task = get_task(cfg.task)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    train = encode(tokenizer, load_split(task, "train", data_dir), cfg.max_length)
    if cfg.max_train_examples and cfg.max_train_examples < len(train):
        train = _subset(train, cfg.max_train_examples, cfg.seed)
    dev = encode(tokenizer, load_split(task, "dev", data_dir), cfg.max_length)
    return train, dev


def task_forward(
    model: torch.nn.Module, task: TaskSpec, batch: dict[str, torch.Tensor], labels: np.ndarray, **kwargs: Any
) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass: the transformers output, the kind's named outputs, and the task loss."""
    out = model(**batch, **kwargs)
    outputs = task.kind.tensors(out, task)
    device = next(iter(outputs.values())).device
    return out, outputs, task.kind.task_loss(outputs, task.kind.label_tensor(labels).to(device))


class Finetuner(TrainLoop):
    """One fine-tuning run into ``out``."""

    def __init__(
        self, cfg: FinetuneConfig, out: Path, progress: TrainProgress | None = None, device: str = "auto"
    ) -> None:
        self.cfg, self.out = cfg, out
        self.device = resolve_device(device)
        self.task = get_task(cfg.task)
        self.progress = progress or TrainProgress(enabled=False)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train, self.dev = load_task_data(cfg, self.tokenizer)
        torch.manual_seed(cfg.seed)
        self.model = load_for_task(cfg.model, self.task).to(self.device)
        self.setup_loop(cfg.epochs)
        self.setup_optimizer(param_groups(self.model, cfg.weight_decay))
        self.ddp_model = wrap_ddp(self.model)

    def stateful(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    def train_step(self, indices: np.ndarray) -> tuple[float, int, str]:
        self.model.train()
        batch = collate(self.train, indices, self.device)
        _, _, loss = task_forward(self.ddp_model, self.task, batch, self.train.labels[indices])
        loss.backward()
        self.step_optimizer()
        return float(loss.detach()), int(batch["attention_mask"].sum()), ""

    def evaluate(self) -> EvalResult:
        return evaluate_encoded(self.model, self.task, self.dev, "dev")

    def finalize(self, result: EvalResult) -> None:
        meta = {
            "format_version": 1,
            "kind": "finetuned",
            "task": self.task.name,
            "base_model": self.cfg.model,
            "base_model_source": resolve_model(self.cfg.model),
            "config": self.cfg.to_dict(),
            "steps": self.state.step,
            "train_examples": len(self.train),
            "wall_time_s": round(self.state.elapsed, 1),
            "history": self.state.history,
            "versions": versions(),
        }
        with staging_dir(self.out) as tmp, quiet_transformers():
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / METADATA_FILE, meta)
        write_json(self.out / EVAL_FILE, {**result.to_json(), "wall_time_s": meta["wall_time_s"]})


def _subset(encoded: Encoded, n: int, seed: int) -> Encoded:
    idx = np.sort(np.random.default_rng(seed).permutation(len(encoded))[:n])
    feats = {k: [v[i] for i in idx] for k, v in encoded.features.items()}
    return Encoded(feats, encoded.labels[idx], encoded.pad_id)


def versions() -> dict[str, str]:
    import transformers

    return {"mlpruning": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
