"""Shared fixtures: tiny random encoders of each supported family and a tiny GLUE folder.

Tiny models reuse the embedded MiniLM tokenizer (a real WordPiece vocabulary) with hidden
sizes of 32-48, so a training step takes milliseconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlpruning.core.contract import TOKENIZER_FILES
from pipeline.models import embedded_default_dir
from pipeline.tasks import EMBEDDED_DIR


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, procs: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with ``procs`` CPU processes (1 thread each); must succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
    cmd += ["--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def save_tiny(
    path: Path, family: str, layers: int = 2, heads: int = 4, hidden: int = 32, ffn: int = 64
) -> Path:
    import torch
    from transformers import AutoModel, BertConfig, DistilBertConfig, RobertaConfig

    torch.manual_seed(0)
    common = dict(vocab_size=30522, max_position_embeddings=128)
    if family == "bert":
        cfg = BertConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            **common,
        )
    elif family == "roberta":
        cfg = RobertaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            pad_token_id=0,
            **common,
        )
        cfg.max_position_embeddings = 130  # RoBERTa offsets positions by padding_idx + 1
    elif family == "distilbert":
        cfg = DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn, **common)
    else:
        raise ValueError(family)
    AutoModel.from_config(cfg).save_pretrained(path)
    src = embedded_default_dir()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny(root / fam, fam) for fam in ("bert", "roberta", "distilbert")}


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    return tiny_models["bert"]


def make_glue_dir(root: Path, train_rows: int = 64, dev_rows: int = 32) -> Path:
    """A GLUE folder with the first rows of the embedded SST-2, MRPC and STS-B files."""
    for folder in ("SST-2", "MRPC", "STS-B"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", train_rows), ("dev", dev_rows)):
            lines = (EMBEDDED_DIR / folder / f"{split}.tsv").read_text(encoding="utf-8-sig").splitlines()
            (root / folder / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return root


@pytest.fixture()
def glue_dir(tmp_path) -> Path:
    return make_glue_dir(tmp_path / "glue")


def random_bert(layers: int, heads: int, hidden: int, ffn: int, seed: int = 0):
    """An untrained BertForSequenceClassification (vocabulary 100), in eval mode."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=32,
    )
    return BertForSequenceClassification(cfg).eval()


def train_tiny_teacher(root: Path, heads: int, **settings) -> tuple[Path, Path]:
    """A tiny BERT (2 layers, hidden 64, FFN 256) fine-tuned on a tiny SST-2: (teacher, glue dir)."""
    from pipeline.config import FinetuneConfig
    from pipeline.finetune import Finetuner

    glue = make_glue_dir(root / "glue")
    base = save_tiny(root / "base", "bert", layers=2, heads=heads, hidden=64, ffn=256)
    settings = {"epochs": 4, "batch_size": 8, "learning_rate": 5e-4, **settings}
    cfg = FinetuneConfig(task="sst2", model=str(base), data_dir=str(glue), max_length=32, **settings)
    Finetuner(cfg, root / "teacher").run()
    return root / "teacher", glue


def prune_tiny(teacher: Path, glue: Path, out: Path) -> Path:
    """Step 1 to 0.5 in one epoch; threshold 0.5 prunes ~38% of every unit from the first step."""
    from pipeline.config import PruneConfig
    from pipeline.pruning.pruner import Pruner

    cfg = PruneConfig(
        task="sst2",
        teacher=str(teacher),
        target=0.5,
        epochs=1,
        batch_size=16,
        threshold_init=0.5,
        data_dir=str(glue),
        max_length=32,
    )
    Pruner(cfg, out).run()
    return out


@pytest.fixture(scope="session")
def masked(tmp_path_factory):
    """A tiny masked checkpoint (``masked/``), pruned from a one-epoch teacher with 8 heads."""
    root = tmp_path_factory.mktemp("masked")
    teacher, glue = train_tiny_teacher(root, heads=8, epochs=1, batch_size=16, learning_rate=1e-4)
    prune_tiny(teacher, glue, root / "masked")
    return root


@pytest.fixture(scope="session")
def stripped(masked, tmp_path_factory):
    """The tiny masked model exported (``onnx/``) and optimized (``opt/``), once per session.

    Read-only for the tests: a test that alters a model copies it first.
    """
    from graph_passes.optimize import optimize
    from pipeline.export import export_onnx

    root = tmp_path_factory.mktemp("stripped")
    export_onnx(masked / "masked", root / "onnx")
    optimize(root / "onnx", root / "opt", scatter_rows="dense")  # no timing-dependent choice
    return root
