"""Max output difference of an ONNX model vs its masked PyTorch checkpoint on random batches.

A quick structural check for tests and benchmarks (``verify`` is the full check on real dev
data): random token ids for each (batch, sequence) shape, the last sequence of every batch
right-padded from ``pad_from`` of its length, run through ONNX Runtime (CPU) and the masked
PyTorch model. Returns the largest absolute difference over all shapes and the task kind's outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_SHAPES = ((1, 7), (4, 40))


def random_parity(
    ckpt: Path,
    onnx_file: Path,
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES,
    seed: int = 1,
    pad_from: float = 1 / 3,
) -> float:
    import onnxruntime as ort
    import torch

    from pipeline.pruning.checkpoint import load_masked
    from pipeline.tasks import get_task

    model, _, manifest = load_masked(ckpt)
    task = get_task(manifest["task"])
    names = task.kind.output_names(task)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    feeds = {i.name for i in session.get_inputs()}
    gen, worst = torch.Generator().manual_seed(seed), 0.0
    for batch, seq in shapes:
        ids = torch.randint(1000, 9000, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, int(seq * pad_from) :] = 0
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        inputs = {k: v for k, v in inputs.items() if k in feeds}
        with torch.no_grad():
            want = task.kind.tensors(model(**inputs), task)
        got = session.run(names, {k: v.numpy() for k, v in inputs.items()})
        for g, w in zip(got, want.values(), strict=True):
            worst = max(worst, float(np.abs(g - w.numpy()).max()))
    return worst
