"""Config values of the wrong type are one-line errors when the config is read, before training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlpruning.cli import main
from mlpruning.cli.common import set_threads
from mlpruning.cli.run_config import load_run_config
from mlpruning.core.errors import UserError
from pipeline.config import BlockPruneConfig, FinetuneConfig, build_config, from_mapping, load_toml

STEP1 = "[step1]\ntarget = 0.5\n"


def _load(tmp_path: Path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return load_run_config(path, tmp_path / "out")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[run]\ntask = 5\n" + STEP1, "[run] task: expected a string, got 5"),
        ("[run]\nteacher = 5\n" + STEP1, "[run] teacher: expected a string, got 5"),
        ("[run]\nthreads = true\n" + STEP1, "[run] threads: expected an integer, got True"),
        ("[run]\nthreads = 1.5\n" + STEP1, "[run] threads: expected an integer, got 1.5"),
        ("[finetune]\ntask = 5\n" + STEP1, "[finetune] task: expected a string, got 5"),
        ("[finetune]\nbatch_size = 16.5\n" + STEP1, "[finetune] batch_size: expected an integer, got 16.5"),
        ("[finetune]\nmodel = 5\n" + STEP1, "[finetune] model: expected a string, got 5"),
        (STEP1 + "max_train_examples = 10.5\n", "[step1] max_train_examples: expected an integer, got 10.5"),
        (STEP1 + "seed = 'x'\n", "[step1] seed: expected an integer, got 'x'"),
        (STEP1 + "seed = true\n", "[step1] seed: expected an integer, got True"),
        (STEP1 + "data_dir = 5\n", "[step1] data_dir: expected a string, got 5"),
        (STEP1 + "freeze_embeddings = 'no'\n", "[step1] freeze_embeddings: expected true or false, got 'no'"),
        ("[step1]\ntarget = '0.5'\n", "[step1] target: expected a number, got '0.5'"),
        (STEP1 + "epochs = true\n", "[step1] epochs: expected a number, got True"),
        (STEP1 + "score_init = nan\n", "[step1] score_init: expected a number, got nan"),
        (STEP1 + "[step2]\ntarget = 0.5\ntask = 5\n", "[step2] task: expected a string, got 5"),
        (STEP1 + "[step2]\ntarget = 0.5\nrow_balanced = 'yes'\n", "row_balanced: expected true or false"),
        (STEP1 + "[step2]\ntarget = 0.5\nblock = 8.5\n", "block: expected a string or an integer, got 8.5"),
        (STEP1 + "[optimize]\nort_fusion = 'yes'\n", "[optimize] ort_fusion: expected true or false"),
        (STEP1 + "[export]\nopset = '17'\n", "[export] opset: expected an integer, got '17'"),
        (STEP1 + "[verify]\natol = '1e-4'\n", "[verify] atol: expected a number, got '1e-4'"),
        (STEP1 + "[bench]\nbatches = [1.5]\n", "[bench] batches: expected a list of integers, got [1.5]"),
        (STEP1 + "[bench]\nbatches = 8\n", "[bench] batches: expected a list of integers, got 8"),
        (STEP1 + "[bench]\nseqs = ['128']\n", "[bench] seqs: expected a list of integers, got ['128']"),
        (STEP1 + "[bench]\nengine = 1\n", "[bench] engine: expected true or false, got 1"),
    ],
)
def test_wrong_value_types_name_table_key_and_type(tmp_path, text, message):
    with pytest.raises(UserError) as info:
        _load(tmp_path, text)
    # the file and table come first, so the user knows where to look
    assert str(info.value).startswith(f"{tmp_path / 'run.toml'} [") and message in str(info.value), info.value


def test_well_typed_values_still_load(tmp_path):
    text = (
        "[run]\nthreads = 2\n[finetune]\nepochs = 1\n"  # an integer is a fine float
        + STEP1
        + "[step2]\ntarget = 0.5\nblock = 16\nrow_balanced = true\n[bench]\nbatches = [1, 8]\nseqs = [16]\n"
    )
    cfg = _load(tmp_path, text)
    assert cfg.threads == 2 and cfg.finetune.epochs == 1
    assert cfg.step2 is not None and cfg.step2.block == "16x16" and cfg.step2.row_balanced is True
    assert cfg.bench.batches == (1, 8) and cfg.bench.seqs == (16,)


def test_from_mapping_handles_optional_and_unset_fields():
    cfg = from_mapping(FinetuneConfig, {"task": "sst2", "max_train_examples": None}, "x")
    assert cfg.max_train_examples is None
    with pytest.raises(UserError, match="x data_dir: expected a string, got 3"):
        from_mapping(FinetuneConfig, {"task": "sst2", "data_dir": 3}, "x")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"finetune = 3\n", "finetune must be a [finetune] table of key = value lines, not 3"),
        (b"[finetune]\ntask = '\xff'\n", "is not UTF-8 text: save the config as UTF-8 TOML"),
    ],
)
def test_load_toml_bad_files(tmp_path, data, message):
    path = tmp_path / "ft.toml"
    path.write_bytes(data)
    with pytest.raises(UserError) as info:
        load_toml(path, "finetune")
    assert message in str(info.value)


def test_run_config_not_utf8(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"[step1]\ntarget = 0.5\n# \xff\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_run_config(path, tmp_path / "out")


def test_build_config_names_the_section(tmp_path):
    path = tmp_path / "prune.toml"
    path.write_text("[prune]\nstep = 'block'\nsource = 's1'\ntarget = 0.5\nblock = [8]\n")
    with pytest.raises(UserError, match=r"prune.toml \[prune\] block: expected a string or an integer"):
        build_config(BlockPruneConfig, "prune", path, {}, ("source", "target"), ("step",))


@pytest.mark.parametrize("threads", [True, 1.5, 0, "2"])
def test_set_threads_rejects_non_integers(threads):
    with pytest.raises(UserError, match="threads must be an integer >= 1"):
        set_threads(threads)


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("the bad config was accepted and training would start")


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("finetune", "[finetune]\ntask = 5\n"),
        ("finetune", "finetune = 3\n"),
        ("run", "[run]\nthreads = true\n" + STEP1),
        ("run", STEP1 + "batch_size = 16.5\n"),
    ],
)
def test_cli_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys, command, text):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = tmp_path / "out"
    argv = ["mlpruning", command, "--out", str(out)]
    argv += [str(config)] if command == "run" else ["--config", str(config)]
    monkeypatch.setattr(sys, "argv", argv)
    # should a bad value get through, fail here instead of training a model
    for module, name in (
        ("mlpruning.cli.run_stages", "build_stages"),
        ("mlpruning.cli.training", "_run_finetune"),
    ):
        monkeypatch.setattr(f"{module}.{name}", _no_training)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not out.exists()
