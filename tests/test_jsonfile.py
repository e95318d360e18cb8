"""read_json: every JSON file a later command reads back fails on one line, naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json


def test_absent_file_is_none_and_an_object_is_returned(tmp_path: Path) -> None:
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "ok.json").write_text(json.dumps({"a": [1, 2]}))
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"a": 1', r"is not valid JSON \(.*line 1\): fix it so"),
        (b"\xff\xfe{}", r"is not valid JSON \(not UTF-8 text\): fix it so"),
        (b"[1, 2]", r"holds no JSON object: fix it so"),
    ],
)
def test_bad_files_name_the_file_and_the_fix(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"bad\.json " + fragment) as err:
        read_json(path, "fix it so")
    assert "\n" not in str(err.value)
