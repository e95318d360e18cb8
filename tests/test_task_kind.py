"""A toy task kind, registered from outside the package, goes through every stage.

The kind is a binary classifier with ONE output named ``score`` (the log-odds of class 1),
trained with binary cross-entropy, distilled with MSE, scored by its sign, compared by its sign,
and served as a probability: every piece differs from the built-in kinds, so a stage that still
assumed "two logits named logits" would fail here. Adding it took this module and two
registrations (the kind, and a task that uses it).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from deploy.batcher import ServedModel
from deploy.verify import Tolerance, verify
from pipeline import kinds, tasks
from pipeline.config import FinetuneConfig, PruneConfig
from pipeline.export import export_onnx
from pipeline.finetune import Finetuner
from pipeline.pruning.pruner import Pruner
from pipeline.task_kind import BATCH, Output, TaskKind
from pipeline.tasks import TaskSpec
from tests.conftest import make_glue_dir, save_tiny

SCORE = "score"


class BinaryScore(TaskKind):
    """One log-odds output per example."""

    name: ClassVar[str] = "toy_binary_score"
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"
    agreement_rule: ClassVar[str] = "same sign"

    def parse_label(self, task, raw: str) -> float:
        if raw not in task.labels:
            raise ValueError(f"label '{raw}' is not one of {', '.join(task.labels)}")
        return float(task.labels.index(raw))

    def configure_head(self, config, task, source: str) -> None:
        config.num_labels = 1
        config.problem_type = "multi_label_classification"

    def outputs(self, task) -> tuple[Output, ...]:
        return (Output(SCORE, (BATCH, 1)),)

    def tensors(self, model_output, task) -> dict[str, torch.Tensor]:
        return {SCORE: model_output.logits}

    def label_tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32)[:, None]

    def task_loss(self, outputs, labels) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs[SCORE], labels)

    def distill_loss(self, student, teacher, temperature: float) -> torch.Tensor:
        return F.mse_loss(student[SCORE], teacher[SCORE])

    def metrics(self, task, outputs, labels) -> dict[str, float]:
        return {"accuracy": float(np.mean((outputs[SCORE][:, 0] > 0) == (labels > 0.5)))}

    def agreeing(self, want, got, atol: float, rtol: float) -> np.ndarray:
        return (want[SCORE][:, 0] > 0) == (got[SCORE][:, 0] > 0)

    def answer(self, row, labels) -> dict[str, Any]:
        return {"probability": float(1 / (1 + np.exp(-float(row[SCORE][0]))))}


@pytest.fixture()
def toy_task():
    kinds.register_kind(BinaryScore())
    spec = TaskSpec(
        "toy_sst2",
        "SST-2",
        ("sentence",),
        "label",
        ("0", "1"),
        ("negative", "positive"),
        ("accuracy",),
        "accuracy",
        (("train", ("train.tsv",)), ("dev", ("dev.tsv",))),
        kind_name=BinaryScore.name,
    )
    tasks.register_task(spec)
    with pytest.raises(ValueError, match="registered already"):
        tasks.register_task(spec)
    with pytest.raises(ValueError, match="registered already"):
        kinds.register_kind(BinaryScore())
    yield spec
    del tasks.TASKS[spec.name], kinds.KINDS[BinaryScore.name]


def test_registering_a_task_with_an_unknown_kind_fails_where_it_is_declared():
    with pytest.raises(Exception, match="unknown task kind 'nope'"):
        TaskSpec("x", "X", ("a",), "l", ("0",), ("zero",), ("accuracy",), "accuracy", (), kind_name="nope")
    upper = TaskSpec("Toy", "X", ("a",), "l", ("0",), ("zero",), ("accuracy",), "accuracy", ())
    with pytest.raises(ValueError, match="lower case"):  # get_task looks names up in lower case
        tasks.register_task(upper)


@pytest.mark.parametrize("task_name", ["sst2", "stsb"])
def test_the_built_in_kinds_losses_are_the_ones_transformers_and_the_paper_use(task_name, tmp_path):
    """The task loss is transformers' own ``labels`` loss, bit for bit; distillation is the
    temperature-scaled KL of the class distributions (T^2, batch mean), MSE for a score."""
    from pipeline.finetune import task_forward
    from pipeline.models import load_for_task

    task = tasks.get_task(task_name)
    model = load_for_task(str(save_tiny(tmp_path / "m", "bert", layers=1, heads=2)), task).eval()
    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 2000, (6, 9)),
        "attention_mask": torch.ones(6, 9, dtype=torch.long),
    }
    labels = np.array([0, 1, 1, 0, 1, 0] if task_name == "sst2" else [0.5, 4.0, 2.2, 1.0, 3.3, 5.0])
    _, outputs, loss = task_forward(model, task, batch, labels)
    hf = model(**batch, labels=task.kind.label_tensor(labels)).loss
    assert torch.equal(loss, hf)
    teacher = {k: v.detach() + torch.randn_like(v) for k, v in outputs.items()}
    got = task.kind.distill_loss(outputs, teacher, 2.0).double()
    s, t = outputs["logits"].double(), teacher["logits"].double()
    if task_name == "sst2":
        p = torch.softmax(t / 2, -1)
        want = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    else:
        want = ((s - t) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_registered_kind_trains_prunes_exports_verifies_and_serves(toy_task, tmp_path):
    glue = make_glue_dir(tmp_path / "glue")
    base = save_tiny(tmp_path / "base", "bert", layers=2, heads=4, hidden=32, ffn=64)
    common = dict(task="toy_sst2", data_dir=str(glue), max_length=32, batch_size=8)
    teacher = tmp_path / "teacher"
    result = Finetuner(FinetuneConfig(model=str(base), epochs=2, learning_rate=5e-4, **common), teacher).run()
    assert set(result.outputs) == {SCORE} and result.outputs[SCORE].shape == (32, 1)
    assert 0 <= result.metrics["accuracy"] <= 1
    assert len(json.loads((teacher / "config.json").read_text())["id2label"]) == 1

    pruned = tmp_path / "pruned"
    prune = PruneConfig(teacher=str(teacher), target=0.6, epochs=1, threshold_init=0.5, **common)
    Pruner(prune, pruned).run()
    assert "accuracy" in json.loads((pruned / "eval.json").read_text())["metrics"]

    export = tmp_path / "export"
    report = export_onnx(pruned, export)
    graph = onnx.load(export / "model.onnx").graph
    assert report["outputs"] == [SCORE] and [o.name for o in graph.output] == [SCORE]

    checked = verify([export], pruned, None, glue, Tolerance())
    metric = checked["metric"]
    assert checked["passed"] and metric["agreement_rule"] == "same sign"
    assert metric["identical_predictions"] == metric["examples"] == 32

    served = ServedModel(export)
    answer = served.prediction(served.run_batch(served.encode(["a fine film"]))[0])
    assert set(answer) == {"probability"} and 0 < answer["probability"] < 1


def test_the_regression_kind_counts_agreeing_scores_in_verify_and_serves_a_score(tmp_path):
    """STS-B through verify: agreement is the kind's (score within tolerance), counted, not None."""
    glue = make_glue_dir(tmp_path / "glue")
    base = save_tiny(tmp_path / "base", "bert", layers=1, heads=2, hidden=32, ffn=64)
    cfg = FinetuneConfig(task="stsb", model=str(base), epochs=1, batch_size=16, data_dir=str(glue))
    Finetuner(cfg, tmp_path / "teacher").run()
    export_onnx(tmp_path / "teacher", tmp_path / "export")
    metric = verify([tmp_path / "export"], tmp_path / "teacher", None, glue, Tolerance())["metric"]
    assert metric["agreement_rule"] == "score within tolerance" and metric["passed"]
    assert metric["identical_predictions"] == metric["examples"] == 32
    assert set(metric["onnx"]) == {"pearson", "spearman"}
    served = ServedModel(tmp_path / "export")
    answer = served.prediction(served.run_batch(served.encode([("a man runs", "a person is running")]))[0])
    assert set(answer) == {"score"}
