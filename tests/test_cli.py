"""The CLI as a user meets it: help texts, one-line errors with exit code 2, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = (
    "finetune",
    "eval",
    "tasks",
    "prune",
    "inspect",
    "export",
    "optimize",
    "bench",
    "verify",
    "run",
    "report",
    "compare",
    "serve",
    "export-triton",
    "build",
)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "mlpruning.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in COMMANDS:
        assert cmd in proc.stdout
    for cmd in COMMANDS:
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0 and "Usage" in sub.stdout, cmd


def test_version():
    from mlpruning import __version__

    assert run_cli("--version").stdout.strip() == f"mlpruning {__version__}"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("finetune", "--task", "qqp", "--out", "{tmp}/o"), "unknown task 'qqp'"),
        (("finetune", "--out", "{tmp}/o"), "missing --task"),
        (("finetune", "--task", "sst2", "--out", "{tmp}/o", "--epochs", "0"), "epochs must be in (0, 100]"),
        (("finetune", "--task", "sst2", "--model", "{tmp}/nope", "--out", "{tmp}/o"), "does not exist"),
        (
            ("finetune", "--task", "sst2", "--model", "{tmp}/gpt2", "--out", "{tmp}/o"),
            "has no mlpruning adapter",
        ),
        (("finetune", "--task", "sst2", "--out", "{tmp}/o", "--data-dir", "{tmp}/bad"), "line 3: 1 columns"),
        (("finetune", "--task", "sst2", "--out", "{tmp}/o", "--config", "{tmp}/missing.toml"), "not found"),
        (
            ("finetune", "--task", "sst2", "--out", "{tmp}/o", "--config", "{tmp}/typo.toml"),
            "unknown key(s) epoch",
        ),
        (("finetune", "--task", "mnli", "--out", "{tmp}/o"), "no embedded train split"),
        (("eval", "{tmp}/missing", "--task", "sst2"), "does not exist"),
        (("eval", "{tmp}/gpt2"), "does not say which task"),
        (("export", "{tmp}/missing", "--out", "{tmp}/o"), "does not exist"),
        (("optimize", "{tmp}/missing", "--out", "{tmp}/o"), "does not exist"),
        (("optimize", "{tmp}/gpt2", "--out", "{tmp}/o"), "has no model.onnx"),
        (("optimize", "{tmp}/gpt2", "--out", "{tmp}/o", "--block", "0x8"), "--block 0x8: use auto, none"),
        (("export", "{tmp}/gpt2", "--out", "{tmp}/o"), "neither a masked checkpoint nor a fine-tuned one"),
        # click's usage errors: one line too, not a boxed usage panel
        (("bench", "{tmp}", "--threads", "0"), "Invalid value for '--threads'"),
        (("eval", "{tmp}", "--bogus"), "No such option: --bogus: see mlpruning eval --help"),
        (("nope",), "No such command 'nope': see mlpruning --help"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, fragment):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "bad" / "SST-2").mkdir(parents=True)
    (tmp_path / "bad" / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbroken line\n")
    (tmp_path / "typo.toml").write_text("[finetune]\ntask = 'sst2'\nepoch = 3\n")
    proc = run_cli(*(a.format(tmp=tmp_path) for a in args))
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_truncated_weights_and_export_folders_are_named(tiny_bert, glue_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    base = ("--task", "sst2", "--data-dir", str(glue_dir))
    assert_one_line_error(run_cli("eval", str(broken), *base), "the checkpoint is corrupt")
    weights.unlink()
    (broken / "model.onnx").write_bytes(b"")
    assert_one_line_error(run_cli("eval", str(broken), *base), "is an ONNX export, not a PyTorch model")


def test_finetune_and_eval_round_trip(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "teacher"
    cfg = tmp_path / "ft.toml"
    cfg.write_text(f"[finetune]\ntask = 'sst2'\nmodel = '{tiny_bert}'\nepochs = 1\nbatch_size = 16\n")
    proc = run_cli("finetune", "--config", str(cfg), "--out", str(out), "--data-dir", str(glue_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    trained = json.loads(proc.stdout)
    assert trained["task"] == "sst2" and "accuracy" in trained["metrics"]
    again = run_cli("finetune", "--config", str(cfg), "--out", str(out), "--data-dir", str(glue_dir))
    assert_one_line_error(again, "already holds a finished run")
    report = tmp_path / "report.json"
    ev = run_cli("eval", str(out), "--data-dir", str(glue_dir), "--report", str(report))
    assert ev.returncode == 0, ev.stderr
    assert json.loads(report.read_text())["metrics"] == pytest.approx(trained["metrics"])
    wrong = run_cli("eval", str(out), "--task", "rte")
    assert_one_line_error(wrong, "was fine-tuned on sst2, not rte")


def test_prune_bad_input_gives_one_line_and_exit_2(tiny_bert, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert, teacher)
    (teacher / "mlpruning.json").write_text(json.dumps({"task": "mrpc"}))
    base = ("prune", "--teacher", str(teacher), "--out", str(tmp_path / "o"))
    assert_one_line_error(run_cli(*base, "--task", "sst2", "--target", "1.5"), "target must be in (0, 1]")
    assert_one_line_error(run_cli(*base, "--task", "sst2", "--target", "0.5"), "fine-tuned on mrpc, not sst2")
    assert_one_line_error(run_cli(*base, "--task", "mrpc"), "missing --target")
    missing = run_cli(
        "prune",
        "--teacher",
        str(tmp_path / "none"),
        "--task",
        "sst2",
        "--target",
        "0.5",
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(missing, "does not exist")
    assert not (tmp_path / "o").exists()


def test_inspect_names_the_tensor_that_disagrees(tiny_bert, tmp_path):
    """A masked checkpoint whose weights are not zero where its masks are off is refused."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from pipeline.adapters import geometry
    from pipeline.pruning.fixed import random_masks, write_masked

    ckpt = tmp_path / "ckpt"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    geo = geometry(model)
    masks = random_masks(geo, [geo.num_heads] * geo.num_layers, 1.0)
    masks["layer1_heads"][2] = False
    write_masked(model, masks, ckpt, "sst2")  # head 2 of layer 1 zeroed, as a real run writes it
    weights = load_file(str(ckpt / "model.safetensors"))
    name = "bert.encoder.layer.1.attention.self.query.weight"
    rows = slice(2 * geo.head_dim, 3 * geo.head_dim)
    weights[name][rows] = torch.randn_like(weights[name][rows])  # weights that disagree with the mask
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("inspect", str(ckpt))
    assert_one_line_error(proc, "tensor bert.encoder.layer.1.attention.self.query.weight has 256 non-zero")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "nope")), "does not exist")
    assert_one_line_error(run_cli("inspect", str(tiny_bert)), "not a masked checkpoint")
