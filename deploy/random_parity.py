"""Max logit difference of an ONNX model vs its masked PyTorch checkpoint on random batches.

A quick structural check for tests and benchmarks (``verify`` is the full check on real dev
data): random token ids for each (batch, sequence) shape, the last sequence of every batch
right-padded from ``pad_from`` of its length, run through ONNX Runtime (CPU) and the masked
PyTorch model. Returns the largest absolute logit difference over all shapes.
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

    model, _, _ = load_masked(ckpt)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    gen, worst = torch.Generator().manual_seed(seed), 0.0
    for batch, seq in shapes:
        ids = torch.randint(1000, 9000, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, int(seq * pad_from) :] = 0
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        inputs = {k: v for k, v in inputs.items() if k in names}
        with torch.no_grad():
            want = model(**inputs).logits.numpy()
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    return worst
