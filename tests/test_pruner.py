"""Step-1 pruning end to end on tiny models: target reached, checkpoint contract, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlpruning.core.errors import UserError
from pipeline.config import PruneConfig
from pipeline.pruning.checkpoint import load_masked, read_masks
from pipeline.pruning.pruner import Pruner
from pipeline.trainloop import RESUME_FILE, Interrupted
from tests.conftest import save_tiny, torchrun, train_tiny_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny BERT (hidden 64, 8 heads of 8, FFN 256) fine-tuned on 64 SST-2 rows.

    Eight heads keep one head at ~1.6% of the encoder weights, fine enough to land within 0.02.
    """
    return train_tiny_teacher(tmp_path_factory.mktemp("prune"), heads=8)


def _cfg(teacher, target=0.5, **kw):
    path, glue = teacher
    # threshold 5 (sigmoid 0.9933) starts near-dense and reaches the target in fewer steps than 10;
    # lambda_final stays at the reference 20000.
    base = dict(
        task="sst2",
        teacher=str(path),
        target=target,
        epochs=100,
        batch_size=8,
        learning_rate=1e-4,
        mask_learning_rate=0.03,
        threshold_init=5.0,
        data_dir=str(glue),
        max_length=32,
        save_every=50,
    )
    return PruneConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("target", "extra"),
    [(0.5, {}), (0.3, {}), (0.3, {"threshold_grad": "constant", "threshold_init": 10.0})],
)
def test_regularizer_lands_on_the_target(teacher, tmp_path, target, extra):
    out = tmp_path / f"r{target}"
    result = Pruner(_cfg(teacher, target, **extra), out).run()
    manifest = json.loads((out / "pruning.json").read_text())
    assert abs(manifest["remaining_ratio"] - target) <= 0.02, manifest["remaining_ratio"]
    assert result.metrics["remaining_ratio"] == pytest.approx(manifest["remaining_ratio"])
    _, masks, _ = load_masked(out)  # weights honour the masks
    layer0 = manifest["layers"][0]
    assert layer0["num_heads_kept"] == int(masks["layer0_heads"].sum())
    assert layer0["matrices"]["attn_out"]["cols"] == layer0["num_heads_kept"] * 8
    for name in ("structure.json", "structure.png", "masks.safetensors", "model.safetensors", "eval.json"):
        assert (out / name).is_file(), name
    assert (out / "structure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["teacher_metrics"]["accuracy"] >= 0 and ev["target"] == target


def test_masks_survive_save_and_load(teacher, tmp_path):
    out = tmp_path / "run"
    Pruner(_cfg(teacher, 0.6, epochs=60), out).run()
    masks = read_masks(out)
    _, loaded, manifest = load_masked(out)
    assert all(torch.equal(masks[k], loaded[k]) for k in masks)
    for i, layer in enumerate(manifest["layers"]):
        assert layer["heads_kept"] == torch.nonzero(masks[f"layer{i}_heads"]).flatten().tolist()
        assert layer["ffn_rows_kept"] == int(masks[f"layer{i}_ffn_in"].sum())
    # plain HF load keeps the zeros
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(out)
    q = hf.bert.encoder.layer[0].attention.self.query.weight.view(8, 8, -1)
    pruned = [h for h in range(8) if h not in manifest["layers"][0]["heads_kept"]]
    assert pruned  # the run did prune heads
    assert all(float(q[h].detach().abs().sum()) == 0.0 for h in pruned)


def test_mismatched_masks_are_named(teacher, tmp_path):
    out = tmp_path / "run"
    Pruner(_cfg(teacher, 0.5, epochs=30), out).run()
    weights = load_file(out / "model.safetensors")
    masks = read_masks(out)
    ffn_off = torch.nonzero(~masks["layer1_ffn_in"]).flatten()
    assert len(ffn_off) > 0
    key = "bert.encoder.layer.1.intermediate.dense.weight"
    weights[key][ffn_off[0]] = 1.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="intermediate.dense.weight has 64 non-zero entries.*disagree"):
        load_masked(out)
    (out / "masks.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="masks.safetensors is unreadable"):
        load_masked(out)


def test_resumed_run_gives_the_same_masks(teacher, tmp_path):
    cfg = _cfg(teacher, 0.5, epochs=6, save_every=7)
    Pruner(cfg, tmp_path / "a").run()
    with pytest.raises(Interrupted):
        Pruner(cfg, tmp_path / "b").run(stop_at_step=21)
    assert (tmp_path / "b" / RESUME_FILE).is_file()
    Pruner(cfg, tmp_path / "b").run(resume=True)
    ma, mb = read_masks(tmp_path / "a"), read_masks(tmp_path / "b")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_teacher_for_another_task_is_refused(teacher, tmp_path):
    with pytest.raises(UserError, match="fine-tuned on sst2, not mrpc"):
        Pruner(_cfg(teacher, 0.5, task="mrpc"), tmp_path / "x")


def test_student_with_another_tokenizer_is_refused(teacher, tmp_path):
    other = save_tiny(tmp_path / "other", "bert")
    (other / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n"
    )
    (other / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="different tokenizers"):
        Pruner(_cfg(teacher, 0.5, student=str(other)), tmp_path / "x")


@pytest.mark.parametrize(("target", "ok"), [(0.0, False), (1.2, False), (-0.1, False), (1.0, True)])
def test_target_range(teacher, target, ok):
    if ok:
        _cfg(teacher, target)
    else:
        with pytest.raises(ValueError, match="target must be in \\(0, 1\\]"):
            _cfg(teacher, target)


def test_ddp_two_processes_gloo(teacher, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): the run completes and both ranks stay in sync."""
    path, glue = teacher
    out = tmp_path / "ddp"
    args = ["--teacher", str(path), "--task", "sst2", "--target", "0.5", "--out", str(out)]
    args += ["--data-dir", str(glue), "--epochs", "10", "--batch-size", "8", "--mask-lr", "0.1"]
    torchrun("-m", "mlpruning.cli", "prune", *args, "--lambda-final", "200", "--quiet")
    assert json.loads((out / "pruning.json").read_text())["remaining_ratio"] < 0.9
    load_masked(out)
