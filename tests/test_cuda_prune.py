"""Step 1 and step 2 on a CUDA device (``pytest -m gpu``; skipped without one).

Both pruners keep their live masks on the device and hand CPU copies to the bookkeeping (ratios,
manifest, files), which also holds the CPU-loaded step-1 masks; these tests are the first place a
mix of the two would raise. The checkpoints they write must load and honour their masks on CPU.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.adapters import geometry
from pipeline.config import BlockPruneConfig, PruneConfig
from pipeline.pruning.block_pruner import BlockPruner
from pipeline.pruning.checkpoint import load_masked, read_masks, remaining_ratio_of
from pipeline.pruning.pruner import Pruner
from pipeline.trainloop import RESUME_FILE, Interrupted
from tests.conftest import train_tiny_teacher

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    return train_tiny_teacher(tmp_path_factory.mktemp("cuda"), heads=4)


def _step1(teacher, **kw) -> PruneConfig:
    path, glue = teacher
    base = dict(task="sst2", teacher=str(path), target=0.5, epochs=1, batch_size=16, threshold_init=0.5)
    return PruneConfig(**{**base, "data_dir": str(glue), "max_length": 32, **kw})


def _checked(out) -> dict:
    """The checkpoint loads on CPU (weights zero where masks are off) and its ratio is its masks'."""
    model, _, manifest = load_masked(out)
    assert next(model.parameters()).device.type == "cpu"
    assert manifest["remaining_ratio"] == pytest.approx(remaining_ratio_of(read_masks(out), geometry(model)))
    return manifest


def test_step1_and_step2_on_cuda(teacher, tmp_path):
    result = Pruner(_step1(teacher), tmp_path / "step1", device="cuda").run()
    manifest = _checked(tmp_path / "step1")
    assert result.metrics["remaining_ratio"] == pytest.approx(manifest["remaining_ratio"])
    cfg = BlockPruneConfig(
        source=str(tmp_path / "step1"),
        target=0.5,
        block="16",
        epochs=4,
        batch_size=8,
        threshold_init=0.5,
        data_dir=str(teacher[1]),
        max_length=32,
    )
    result = BlockPruner(cfg, tmp_path / "step2", device="cuda").run()
    blocks = _checked(tmp_path / "step2")
    assert blocks["step"] == "block" and blocks["remaining_ratio"] < manifest["remaining_ratio"]
    assert result.metrics["remaining_ratio"] == pytest.approx(blocks["remaining_ratio"])


def test_interrupted_cuda_run_resumes_like_an_uninterrupted_one(teacher, tmp_path):
    """16 steps, stopped at 7. Not compared bit for bit: CUDA's atomic adds make some gradient sums
    order-dependent, so the resumed run must land where the uninterrupted one does."""
    cfg = _step1(teacher, epochs=4, save_every=5)
    whole = Pruner(cfg, tmp_path / "a", device="cuda").run()
    with pytest.raises(Interrupted) as info:
        Pruner(cfg, tmp_path / "b", device="cuda").run(stop_at_step=7)
    assert info.value.step == 7 and (tmp_path / "b" / RESUME_FILE).is_file()
    resumed = Pruner(cfg, tmp_path / "b", device="cuda").run(resume=True)
    assert _checked(tmp_path / "b")["remaining_ratio"] == pytest.approx(
        whole.metrics["remaining_ratio"], abs=0.02
    )
    assert resumed.metrics["remaining_ratio"] == pytest.approx(_checked(tmp_path / "b")["remaining_ratio"])
