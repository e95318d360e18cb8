"""Package layout promises: the CLI imports no torch; CI runs the README's test command.

The layers and the torch-free modules are pinned by tests/test_layers.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True)


def test_cli_module_and_task_data_do_not_import_torch():
    code = textwrap.dedent(
        """
        import mlpruning.cli
        from pipeline.tasks import get_task, load_split
        from pipeline.metrics import compute_metrics
        assert len(load_split(get_task('rte'), 'dev')) == 277
        assert 'torch' not in sys.modules
        print('ok')
        """
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def test_the_block_really_blocks():
    proc = _run("import torch")
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    assert "make test" in readme.split("\n## ")[0]  # stated at the top
    assert "make demo" in readme.split("\n## ")[0]
    assert [ln for ln in ci.splitlines() if ln.strip() and not ln.startswith(("#", "set ", "cd "))] == [
        "make test"
    ]
    assert "torch==$(TORCH_VERSION)" in (root / "Makefile").read_text()


def test_data_readme_lists_the_shipped_checksums():
    import json

    from pipeline.tasks import EMBEDDED_DIR

    sums = json.loads((EMBEDDED_DIR / "checksums.json").read_text())
    readme = (EMBEDDED_DIR.parent / "README.md").read_text()
    for rel, entry in sums.items():
        assert f"| glue/{rel} |" in readme and entry["sha256"] in readme, rel
