"""Data-parallel training on CPU (gloo, 2 processes under torchrun; slow): fine-tuning, and a
step-1 run that is stopped and resumed ending bit-identical to an uninterrupted one. Fast: how
ranks pick their GPU and split a short batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlpruning.core.errors import UserError
from pipeline import trainloop
from pipeline.pruning.checkpoint import load_masked, read_masks
from pipeline.trainloop import RESUME_FILE, TrainLoop
from tests.conftest import torchrun, train_tiny_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return train_tiny_teacher(tmp_path_factory.mktemp("ddp"), heads=4)


@pytest.mark.slow
def test_finetune_under_torchrun_writes_one_checkpoint(teacher, tmp_path):
    path, glue = teacher
    out = tmp_path / "ft"
    args = ["--task", "sst2", "--model", str(path), "--out", str(out), "--data-dir", str(glue)]
    args += ["--epochs", "2", "--batch-size", "8", "--quiet"]
    proc = torchrun("-m", "mlpruning.cli", "finetune", *args)
    assert proc.stdout.count('"out"') == 1  # rank 0 reports, rank 1 does not
    meta = json.loads((out / "mlpruning.json").read_text())
    assert meta["steps"] == 2 * 8 and (out / "eval.json").is_file() and not (out / RESUME_FILE).exists()


@pytest.mark.slow
def test_stopped_and_resumed_ddp_run_equals_an_uninterrupted_one(teacher, tmp_path):
    path, glue = teacher
    # The ranks pad their halves of a batch to different lengths, so they draw different numbers
    # of dropout values and each must get its own generator back; 36 examples end every epoch
    # with a short batch of 4.
    cfg = dict(task="sst2", teacher=str(path), target=0.5, epochs=3, batch_size=8, threshold_init=0.5)
    cfg |= dict(data_dir=str(glue), max_length=32, save_every=5, max_train_examples=36)
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    torchrun(worker, json.dumps(cfg), str(tmp_path / "a"), "full")
    torchrun(worker, json.dumps(cfg), str(tmp_path / "b"), "stop", "7")
    assert (tmp_path / "b" / RESUME_FILE).is_file() and not (tmp_path / "b" / "pruning.json").exists()
    torchrun(worker, json.dumps(cfg), str(tmp_path / "b"), "resume")
    ma, mb = read_masks(tmp_path / "a"), read_masks(tmp_path / "b")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    load_masked(tmp_path / "b")


def test_each_local_rank_gets_its_own_gpu():
    assert [trainloop._local_gpu(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert trainloop._local_gpu(3, 1) == 0  # the scheduler shows this process only its GPU
    with pytest.raises(UserError, match="local rank 2 has no GPU of its own .*--nproc_per_node 2"):
        trainloop._local_gpu(2, 2)


def test_a_batch_smaller_than_the_world_gives_every_rank_examples(monkeypatch):
    monkeypatch.setattr(trainloop, "world", lambda: (3, 4))
    assert TrainLoop._batch(None, [np.array([5, 6])], 0).tolist() == [6]
    monkeypatch.setattr(trainloop, "world", lambda: (1, 2))
    assert TrainLoop._batch(None, [np.array([1, 2, 3, 4, 5])], 0).tolist() == [2, 4]
