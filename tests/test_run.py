"""`mlpruning run`: a tiny pipeline end to end, then skips, reruns and restarts by content hash."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deploy import run_layout as L
from mlpruning.cli import app, main
from mlpruning.cli.run_config import load_run_config
from mlpruning.cli.run_stages import StageActions, build_stages
from mlpruning.cli.runner import RunState, Stage, content_hash, decide
from mlpruning.core.errors import CheckFailed, UserError
from tests.conftest import make_glue_dir, save_tiny

CONFIG = """
[run]
task = "sst2"
threads = 1

[finetune]
model = "{model}"
epochs = 1
batch_size = 16
max_length = 32
data_dir = "{glue}"

[step1]
target = 0.5
epochs = 1
batch_size = 16
max_length = 32
threshold_init = 0.5
data_dir = "{glue}"

[step2]
block = 8
target = 0.6
epochs = 1
batch_size = 16
max_length = 32
threshold_init = 0.5
data_dir = "{glue}"

[optimize]
scatter_rows = "dense"
block_sparse = "auto"

[bench]
batches = [1]
seqs = [16]
rounds = 2
iters = 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    glue = make_glue_dir(root / "glue")
    model = save_tiny(root / "base", "bert", layers=2, heads=8, hidden=64, ffn=256)
    config = root / "tiny.toml"
    config.write_text(CONFIG.format(model=model, glue=glue))
    return config, root / "out"


def _run(config: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["run", str(config), "--out", str(out), "--quiet", *extra])


def _state(out: Path) -> dict:
    return json.loads((out / L.RUN_STATE).read_text())["stages"]


def test_run_writes_every_stage_then_skips_them(setup):
    config, out = setup
    first = _run(config, out)
    assert first.exit_code == 0, first.output
    names = [v.name for v in L.variants(out)]  # as run.json lists them
    assert names == ["dense", "step1", "step2"]
    for v in names:
        assert (L.model_dir(out, v) / "model.onnx").is_file(), v
        assert json.loads(L.verify_report(out, v).read_text())["passed"], v
    assert (out / L.REPORT_HTML).is_file() and (out / L.REPORT_MD).is_file()
    summary = json.loads((out / L.SUMMARY).read_text())
    assert set(summary["variants"]) == set(names)
    before = _state(out)
    assert all(rec["status"] == "done" for rec in before.values())
    again = _run(config, out)
    assert again.exit_code == 0, again.output
    assert _state(out) == before  # nothing ran: the same records, times included


def test_changed_input_or_output_reruns_that_stage_and_what_follows(setup):
    config, out = setup
    if not (out / L.RUN_STATE).is_file():
        assert _run(config, out).exit_code == 0
    before = _state(out)
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 3"))
    (L.opt_dir(out, "step2") / "optimize.json").unlink()  # as if a crash lost it
    result = _run(config, out)
    assert result.exit_code == 0, result.output
    after = _state(out)
    rerun = {k for k in after if after[k]["finished"] != before[k]["finished"]}
    assert rerun == {"optimize:step2", "verify:step2", "bench:step2", "bench:step1"}


def test_a_run_folder_moved_elsewhere_skips_what_it_finished(setup, tmp_path):
    """The steps' teacher and source folders count by name, not by where the run lies; a
    record written before that rule (full paths) still matches in place."""
    from mlpruning.cli.runner import input_hash

    config, finished = setup
    if not (finished / "run.json").is_file():
        assert _run(config, finished).exit_code == 0
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished, moved)
    before = _state(moved)
    assert _run(config, moved).exit_code == 0
    assert _state(moved) == before  # no stage ran again, trainings included

    cfg = load_run_config(config, moved)
    stages = {s.name: s for s in build_stages(StageActions(cfg, moved, "cpu", None))}
    state = RunState(moved, config)
    step1 = stages["step1"]
    old = input_hash(step1, cfg, state, legacy=True)
    assert old != input_hash(step1, cfg, state)
    state.put("step1", **{**state.get("step1"), "input_hash": old})  # as an older run recorded it
    assert decide(step1, input_hash(step1, cfg, state), state, old) == "skip"
    assert decide(step1, input_hash(step1, cfg, state), state) == "run"


def test_interrupted_training_stage_resumes(tmp_path):
    out = tmp_path / "step1"
    (out / "resume").mkdir(parents=True)
    stage = Stage("step1", out, out / "eval.json", (), lambda resume: None, trains=True)
    state = RunState(tmp_path, tmp_path / "c.toml")
    state.put("step1", status="started", input_hash="abc")
    assert decide(stage, "abc", state) == "resume"
    assert decide(stage, "changed", state) == "run"
    (out / "eval.json").write_text("{}")
    state.put("step1", status="done", input_hash="abc", output_hash=content_hash(out))
    assert decide(stage, "abc", state) == "skip"
    (out / "eval.json").write_text('{"edited": true}')
    assert decide(stage, "abc", state) == "run"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[run]\nthreads = 0\n", "threads must be"),
        ("[step1]\ntarget = 1.5\n", "[step1]: target must be in (0, 1]"),
        ("[step1]\ntarget = 0.5\n[bench]\nbatches = [0]\n", "[bench]"),
        ("[finetune]\nepochs = 1\n", "[step1]: set target"),
        ("[step1]\ntarget = 0.5\n[optimize]\nscatter_rows = 'fast'\n", "scatter_rows must be one of"),
        ("[wrong]\n", "unknown table(s) wrong"),
        ("[run]\nteacher = '/nonexistent'\n", "is not a checkpoint folder"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, monkeypatch, capsys, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    monkeypatch.setattr(sys, "argv", ["mlpruning", "run", str(config), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", ["run-quick-sst2.toml", "run-paper-bert-base-sst2.toml"])
def test_presets_are_valid(tmp_path, preset):
    cfg = load_run_config(Path("configs") / preset, tmp_path)
    assert cfg.task == "sst2" and cfg.step2 is not None
    assert cfg.step1.teacher == str(tmp_path / "teacher") and cfg.step2.source == str(tmp_path / "step1")


def test_a_quantize_table_adds_an_int8_copy_of_every_variant(setup, tmp_path):
    """Reuses the finished tiny run's teacher and steps: only the INT8 stages run here."""
    config, finished = setup
    if not (finished / "run.json").is_file():
        assert _run(config, finished).exit_code == 0
    out = tmp_path / "out"
    shutil.copytree(finished, out)  # the shared run stays as the other tests expect it
    quantized = tmp_path / "q.toml"
    table = "[quantize]\nmode = 'dynamic'\ncalibration_examples = 8\n"
    table += "max_metric_drop = 1.0\nmin_agreement = 0.0\n"  # a tiny random model: no accuracy to keep
    quantized.write_text(config.read_text() + table)
    before = _state(out)
    result = _run(quantized, out)
    assert result.exit_code == 0, result.output
    names = [v.name for v in L.variants(out)]
    assert names == ["dense", "step1", "step2", "dense-int8", "step1-int8", "step2-int8"]
    after = _state(out)
    assert all(after[s]["finished"] == before[s]["finished"] for s in ("teacher", "step1", "step2"))
    for v in ("dense-int8", "step1-int8", "step2-int8"):
        assert L.model_dir(out, v) == out / "quant" / v and (out / "quant" / v / "quantize.json").is_file()
        report = json.loads(L.verify_report(out, v).read_text())
        assert report["int8"] and report["passed"] and report["tolerance"]["min_agreement"] == 0.99
        assert json.loads(L.bench_report(out, v).read_text())["points"]
    summary = json.loads((out / L.SUMMARY).read_text())
    assert summary["variants"]["step1-int8"]["int8_of"] == "step1"
    assert summary["variants"]["dense-int8"]["remaining_ratio"] == 1.0
    assert all(summary["variants"][v]["size_bytes"] > 0 for v in names)
    made = summary["variants"]["step2-int8"]["quantization"]
    assert made["mode"] == "dynamic" and made["candidates"] >= 2 and "vnni" in made["cpu"]
    assert summary["variants"]["step2"]["quantization"] is None
    report = (out / L.REPORT_MD).read_text()
    assert "step2-int8" in report and "## INT8 copies" in report and "VNNI" in report


def test_a_quantize_stage_that_finds_no_int8_copy_leaves_the_rest_of_the_run_going(
    setup, tmp_path, monkeypatch
):
    import deploy.quantize

    config, finished = setup
    if not (finished / "run.json").is_file():
        assert _run(config, finished).exit_code == 0
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    quantized = tmp_path / "q.toml"
    quantized.write_text(config.read_text() + "[quantize]\nmode = 'dynamic'\nmax_metric_drop = 1.0\n")
    real, calls = deploy.quantize.quantize, []

    def quantize(src, dst, *args):
        calls.append(src.name)
        if src.name == "step1":
            raise CheckFailed("no INT8 copy of step1 keeps accuracy within 0.01")
        return real(src, dst, *args)

    monkeypatch.setattr(deploy.quantize, "quantize", quantize)
    result = _run(quantized, out)
    assert result.exit_code == 1 and "failed: quantize:step1-int8" in result.output
    state = _state(out)
    assert state["quantize:step1-int8"]["status"] == "failed"
    assert state["verify:step1-int8"] == {"status": "blocked", "by": "quantize:step1-int8"}
    assert state["bench:step2-int8"]["status"] == "done" and (out / L.REPORT_MD).is_file()
    report = (out / L.REPORT_MD).read_text()
    assert "quantize:step1-int8 failed: no INT8 copy of step1 keeps accuracy" in report
    assert (
        _run(quantized, out).exit_code == 1 and calls.count("step1") == 1
    )  # same inputs: not measured again


def test_the_config_makes_the_variant_list_and_run_json_records_it(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[run]\ntask = "sst2"\n[step1]\ntarget = 0.5\n')
    cfg = load_run_config(config, tmp_path / "run")
    assert [(v.name, v.checkpoint, v.baseline) for v in cfg.variants] == [
        ("dense", "teacher", True),
        ("step1", "step1", False),
    ]
    state = RunState(tmp_path / "run", config, cfg.variants)
    (tmp_path / "run").mkdir()
    state.put("teacher", status="started")
    assert [v.name for v in L.variants(tmp_path / "run")] == ["dense", "step1"]
    stages = [s.name for s in build_stages(StageActions(cfg, tmp_path / "run", "cpu", None))]
    assert not any("step2" in name for name in stages) and "bench:step1" in stages


def test_a_variant_can_have_its_own_verify_bounds(tmp_path):
    config = tmp_path / "c.toml"
    body = "[step1]\ntarget = 0.5\n[step2]\ntarget = 0.6\n[verify]\natol = 2e-4\n"
    config.write_text(body + "[verify.step2]\nmin_agreement = 0.99\nmax_metric_drop = 0.01\n")
    cfg = load_run_config(config, tmp_path / "run")
    assert cfg.verify_for("step1") == cfg.verify and cfg.verify.resolved(int8=False).min_agreement == 1.0
    step2 = cfg.verify_for("step2")
    assert (step2.atol, step2.min_agreement, step2.max_metric_drop) == (2e-4, 0.99, 0.01)
    assert cfg.stage_inputs("verify:step2") != cfg.stage_inputs("verify:step1")
    # hashed resolved: runs written before the precision defaults existed keep their verify stages
    before = {"atol": 2e-4, "rtol": 1e-3, "min_agreement": 1.0, "max_metric_drop": None}
    assert cfg.stage_inputs("verify:step1") == {"verify": before}
    config.write_text(body + "[verify.int8]\nmin_agreement = 0.99\n")
    with pytest.raises(UserError, match=r"\[verify.int8\]: no such variant in this run; variants: dense"):
        load_run_config(config, tmp_path / "run")


def _workflow_steps() -> list[dict]:
    workflow = yaml.safe_load(Path(".github/workflows/quick-run.yml").read_text())
    (job,) = workflow["jobs"].values()
    return job["steps"]


def test_ci_workflow_gates_and_uploads_what_a_run_writes(setup, tmp_path):
    """The workflow's commands are ours and its upload paths are what `run` + `compare` write."""
    config, out = setup
    if not (out / L.RUN_STATE).is_file():
        assert _run(config, out).exit_code == 0
    steps = _workflow_steps()
    demo = next(s["run"] for s in steps if "make demo" in s.get("run", ""))
    run_dir = demo.split("DEMO_OUT=")[1].split()[0]
    assert "demo:" in Path("Makefile").read_text()
    gate = next(s["run"] for s in steps if " compare " in s.get("run", "")).split()
    assert gate[0] == ".venv/bin/mlpruning" and gate[2] == run_dir
    baseline = Path(gate[gate.index("--baseline") + 1])
    assert json.loads(baseline.read_text())["task"] == "sst2"
    # the same gate on the tiny run, against a baseline written from it
    own = tmp_path / "own.json"
    assert CliRunner().invoke(app, ["compare", str(out), "--write-baseline", str(own)]).exit_code == 0
    args = [a.replace(run_dir, str(out)) for a in gate[1:]]
    args[args.index("--baseline") + 1] = str(own)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    upload = next(s for s in steps if "upload-artifact" in s.get("uses", ""))
    assert upload["if"] == "always()"
    for path in upload["with"]["path"].split():
        assert Path(path.replace(run_dir, str(out))).exists(), path
