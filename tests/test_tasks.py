from __future__ import annotations

import shutil

import pytest

from mlpruning.core.errors import UserError
from pipeline import tasks
from pipeline.tasks import TASKS, get_task, load_split

EXPECTED_ROWS = {
    ("sst2", "train"): 67349,
    ("sst2", "dev"): 872,
    ("mrpc", "train"): 3668,
    ("mrpc", "dev"): 408,
    ("rte", "train"): 2490,
    ("rte", "dev"): 277,
    ("stsb", "train"): 5749,
    ("stsb", "dev"): 1500,
    ("mnli", "dev"): 9815,
}


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED_ROWS))
def test_embedded_splits_load_with_official_counts(task, split):
    ex = load_split(get_task(task), split)
    assert len(ex) == EXPECTED_ROWS[(task, split)]
    spec = get_task(task)
    assert all(len(t) == len(spec.text_columns) for t in ex.texts)
    assert all(t and all(s for s in t) for t in ex.texts[:100])
    if spec.kind_name == "regression":
        assert 0.0 <= min(ex.labels) and max(ex.labels) <= 5.0
    else:
        assert set(ex.labels) == set(map(float, range(len(spec.labels))))


def test_label_distributions_match_data_readme():
    sst_dev = load_split(get_task("sst2"), "dev")
    assert sst_dev.labels.count(0.0) == 428 and sst_dev.labels.count(1.0) == 444
    mnli = load_split(get_task("mnli"), "dev")
    counts = [mnli.labels.count(float(i)) for i in range(3)]
    assert counts == [3479, 3123, 3213]  # entailment, neutral, contradiction
    assert mnli.texts[0][0].startswith("The new rights are nice enough")
    mrpc = load_split(get_task("mrpc"), "train")  # file starts with a BOM
    assert mrpc.labels.count(1.0) == 2474


def test_aliases_and_unknown_task():
    assert get_task("SST-2") is TASKS["sst2"]
    with pytest.raises(UserError, match="unknown task 'qqp'.*sst2"):
        get_task("qqp")


def test_mnli_has_no_embedded_train_split():
    with pytest.raises(UserError, match="no embedded train split.*--data-dir"):
        load_split(get_task("mnli"), "train")


def test_corrupt_embedded_file_is_detected(tmp_path, monkeypatch):
    copy = tmp_path / "glue"
    shutil.copytree(tasks.EMBEDDED_DIR, copy)
    path = copy / "SST-2" / "dev.tsv"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    monkeypatch.setattr(tasks, "EMBEDDED_DIR", copy)
    with pytest.raises(UserError, match="corrupt .*sha256.*reinstall"):
        load_split(get_task("sst2"), "dev")
    load_split(get_task("rte"), "dev")  # untouched files still load


def test_user_data_dir(glue_dir):
    ex = load_split(get_task("sst2"), "train", glue_dir)
    assert len(ex) == 64
    with pytest.raises(UserError, match="RTE/train.tsv not found"):
        load_split(get_task("rte"), "train", glue_dir)
    with pytest.raises(UserError, match="is not a folder"):
        load_split(get_task("sst2"), "train", glue_dir / "nope")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("sentence\tlabel\nfine film\t1\nbad film\n", "line 3: 1 columns"),
        ("sentence\tlabel\nfine film\t7\n", "line 2: label '7' is not one of 0, 1"),
        ("text\tlabel\nfine film\t1\n", "lacks column\\(s\\) sentence"),
        ("", "is empty"),
        ("sentence\tlabel\n", "no examples"),
    ],
)
def test_malformed_user_files_name_the_line(glue_dir, content, message):
    (glue_dir / "SST-2" / "dev.tsv").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_split(get_task("sst2"), "dev", glue_dir)


def test_stsb_scores_must_be_numbers(glue_dir):
    path = glue_dir / "STS-B" / "dev.tsv"
    lines = path.read_text().splitlines()
    cols = lines[1].split("\t")
    cols[-1] = "high"
    lines[1] = "\t".join(cols)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="line 2: score 'high' is not a number"):
        load_split(get_task("stsb"), "dev", glue_dir)


def test_mnli_glue_tsv_from_data_dir(tmp_path):
    d = tmp_path / "MNLI"
    d.mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    rows = [
        "0\t1\t1n\tfiction\tA man sleeps.\tA person rests.\tentailment\tentailment",
        "1\t2\t2c\tfiction\tIt rains.\tIt is dry.\tcontradiction\tcontradiction",
    ]
    (d / "train.tsv").write_text("\n".join([header, *rows]) + "\n")
    ex = load_split(get_task("mnli"), "train", tmp_path)
    assert ex.labels == (0.0, 2.0)
    assert ex.texts[1] == ("It rains.", "It is dry.")


@pytest.mark.parametrize("name", [5, None, 2.0, ["sst2"]])
def test_task_names_must_be_strings(name):
    with pytest.raises(UserError, match="task must be a task name, one of sst2"):
        get_task(name)


@pytest.mark.parametrize(
    ("task", "rel", "data"),
    [
        ("sst2", "SST-2/dev.tsv", b"sentence\tlabel\n\xff\xfe film\t1\n"),
        ("mnli", "MNLI/dev_matched.jsonl", b'{"premise": "\xff", "hypothesis": "b", "label": "neutral"}\n'),
    ],
)
def test_files_that_are_not_utf8_are_named(tmp_path, task, rel, data):
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with pytest.raises(UserError, match=f"{path.name} is not UTF-8 text .*pass UTF-8"):
        load_split(get_task(task), "dev", tmp_path)
