from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mlpruning.core.errors import UserError
from pipeline.config import FinetuneConfig
from pipeline.evaluate import evaluate_checkpoint
from pipeline.finetune import Finetuner
from pipeline.trainloop import RESUME_FILE, Interrupted, check_out_dir


def _cfg(model, glue_dir, **kw):
    base = dict(
        task="sst2",
        model=str(model),
        epochs=2,
        batch_size=8,
        learning_rate=5e-4,
        save_every=3,
        seed=3,
        data_dir=str(glue_dir),
        max_length=32,
    )
    return FinetuneConfig(**{**base, **kw})


def _weights(out):
    return load_file(out / "model.safetensors")


def test_finetune_writes_a_loadable_checkpoint_and_learns(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_bert, glue_dir, epochs=6)
    result = Finetuner(cfg, out).run()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "eval.json", "mlpruning.json"} <= names
    assert not (out / RESUME_FILE).exists()
    assert not [n for n in names if n.endswith(".tmp")]
    meta = json.loads((out / "mlpruning.json").read_text())
    assert meta["task"] == "sst2" and meta["steps"] == 6 * 8 and len(meta["history"]) == 6
    saved = json.loads((out / "eval.json").read_text())
    assert saved["metrics"] == result.metrics and saved["num_examples"] == 32
    again = evaluate_checkpoint(out, None, glue_dir)  # reload from disk: same numbers
    assert again.metrics == pytest.approx(result.metrics)
    got, want = again.outputs["logits"], result.outputs["logits"]
    assert torch.allclose(torch.from_numpy(got), torch.from_numpy(want), atol=1e-5)


def test_training_memorises_a_small_set(tiny_bert, glue_dir, tmp_path):
    import numpy as np

    cfg = _cfg(tiny_bert, glue_dir, epochs=40, learning_rate=2e-3, warmup_ratio=0.0)
    ft = Finetuner(cfg, tmp_path / "run")
    plan = [np.arange(i, i + 8) for i in range(0, 64, 8)]
    first = sum(ft.train_step(b)[0] for b in plan)
    for _ in range(20):
        for b in plan:
            ft.train_step(b)
    last = sum(ft.train_step(b)[0] for b in plan)
    assert last < 0.1 * first


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_finetune(tiny_models, glue_dir, tmp_path, family):
    result = Finetuner(_cfg(tiny_models[family], glue_dir, epochs=1), tmp_path / family).run()
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert (tmp_path / family / "eval.json").is_file()


def test_regression_and_pair_tasks(tiny_bert, glue_dir, tmp_path):
    r = Finetuner(_cfg(tiny_bert, glue_dir, task="stsb", epochs=1), tmp_path / "stsb").run()
    assert set(r.metrics) == {"pearson", "spearman"}
    m = Finetuner(_cfg(tiny_bert, glue_dir, task="mrpc", epochs=1), tmp_path / "mrpc").run()
    assert set(m.metrics) == {"accuracy", "f1"}


def test_interrupted_then_resumed_equals_uninterrupted(tiny_bert, glue_dir, tmp_path):
    cfg = _cfg(tiny_bert, glue_dir)
    Finetuner(cfg, tmp_path / "a").run()
    with pytest.raises(Interrupted) as info:
        Finetuner(cfg, tmp_path / "b").run(stop_at_step=5)
    assert info.value.step == 5 and (tmp_path / "b" / RESUME_FILE).is_file()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    check_out_dir(tmp_path / "b", resume=True, overwrite=False)
    Finetuner(cfg, tmp_path / "b").run(resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist_a = json.loads((tmp_path / "a" / "mlpruning.json").read_text())["history"]
    hist_b = json.loads((tmp_path / "b" / "mlpruning.json").read_text())["history"]
    assert hist_a == hist_b


def test_resume_state_of_the_previous_format_still_resumes_exactly(tiny_bert, glue_dir, tmp_path):
    """State files written before per-rank generators hold one ``rng``; they resume as before."""
    cfg = _cfg(tiny_bert, glue_dir)
    Finetuner(cfg, tmp_path / "a").run()
    with pytest.raises(Interrupted):
        Finetuner(cfg, tmp_path / "b").run(stop_at_step=5)
    path = tmp_path / "b" / RESUME_FILE
    blob = torch.load(path, weights_only=True)
    (rank0,) = blob.pop("rngs")
    torch.save({**blob, "rng": rank0["cpu"], "cuda_rng": []}, path)
    Finetuner(cfg, tmp_path / "b").run(resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_periodic_checkpoint_after_a_hard_kill(tiny_bert, glue_dir, tmp_path):
    """A kill between saves loses only the steps since the last save (step 3 here)."""
    cfg = _cfg(tiny_bert, glue_dir)
    Finetuner(cfg, tmp_path / "a").run()
    with pytest.raises(Interrupted):
        Finetuner(cfg, tmp_path / "b").run(stop_at_step=3)
    state = torch.load(tmp_path / "b" / RESUME_FILE, weights_only=True)
    assert state["step"] == 3
    Finetuner(cfg, tmp_path / "b").run(resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_out_dir_guards(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no interrupted run to resume"):
        check_out_dir(out, resume=True, overwrite=False)
    cfg = _cfg(tiny_bert, glue_dir, epochs=1)
    with pytest.raises(Interrupted):
        Finetuner(cfg, out).run(stop_at_step=2)
    with pytest.raises(UserError, match="interrupted run: pass --resume"):
        check_out_dir(out, resume=False, overwrite=False)
    with pytest.raises(UserError, match="started with batch_size=8, not 4"):
        Finetuner(_cfg(tiny_bert, glue_dir, epochs=1, batch_size=4), out).run(resume=True)
    Finetuner(cfg, out).run(resume=True)
    with pytest.raises(UserError, match="already holds a finished run"):
        check_out_dir(out, resume=False, overwrite=False)
    check_out_dir(out, resume=False, overwrite=True)
    assert not (out / "eval.json").exists()


def test_out_dirs_that_cannot_take_a_run_are_refused_before_training(tiny_bert, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        check_out_dir(tmp_path / "afile", resume=False, overwrite=False)
    with pytest.raises(UserError, match=r"cannot write .*afile/run \(.*\): choose another output path"):
        check_out_dir(tmp_path / "afile" / "run", resume=False, overwrite=False)
    with pytest.raises(UserError, match="already holds a model: choose another --out"):
        check_out_dir(tiny_bert, resume=False, overwrite=False)  # a model folder, not a run
    check_out_dir(tmp_path / "new" / "run", resume=False, overwrite=False)
    assert not (tmp_path / "new").exists()  # checked, nothing created yet


def test_corrupt_resume_state_is_reported(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "run"
    (out / RESUME_FILE).parent.mkdir(parents=True)
    (out / RESUME_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable.*--overwrite"):
        Finetuner(_cfg(tiny_bert, glue_dir, epochs=1), out).run(resume=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be in"),
        ("batch_size", 0, "batch_size must be"),
        ("learning_rate", 2.0, "learning_rate must be"),
        ("warmup_ratio", 1.0, "warmup_ratio"),
        ("max_length", 4, "max_length must be"),
        ("task", "qqp", "unknown task"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises((ValueError, UserError), match=message):
        FinetuneConfig(**{"task": "sst2", field: value})
