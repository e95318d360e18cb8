"""Export the embedded all-MiniLM-L6-v2, cut to 3 layers, as a third party with transformers 4.x did.

Not part of the test suite, and not run with the project's venv: it needs transformers 4.x and
sentence-transformers (see ``tests/fixtures/legacy/make_fixtures.py`` for the scratch venv).
The whole ``SentenceTransformer`` module is exported with the TorchScript exporter at opset 14,
so node names carry the ``/0/auto_model/`` prefix and every heads-merge Reshape ends in the
constant all-head size (384): the style of most BERT-class ONNX files in the wild. The folder
gets model.onnx and the tokenizer files, no config.json and no pruning.json.

    /tmp/legacy/bin/python benchmarks/export_legacy_minilm.py MODEL_DIR OUT_DIR

``MODEL_DIR`` is the embedded model folder (``pipeline.models.embedded_default_dir()``).
``benchmarks/foreign_pruned.py --legacy OUT_DIR`` then prunes and optimizes it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class ExportedST(SentenceTransformer):
    """The SentenceTransformer itself as the exported root, taking the three tensors."""

    def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
        tensors = (input_ids, attention_mask, token_type_ids)
        out = super().forward(dict(zip(INPUTS, tensors, strict=True)))
        return out["sentence_embedding"], out["token_embeddings"]


def main(model_dir: Path, out: Path, layers: int = 3) -> None:
    st = ExportedST(str(model_dir), device="cpu")
    bert = st[0].auto_model
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    st.eval()
    ids = torch.randint(1000, 2000, (2, 16))
    out.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "token_embeddings")}
    torch.onnx.export(
        st,
        (ids, torch.ones_like(ids), torch.zeros_like(ids)),
        str(out / "model.onnx"),
        dynamo=False,
        opset_version=14,
        input_names=list(INPUTS),
        output_names=["sentence_embedding", "token_embeddings"],
        dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
    )
    for name in TOKENIZER_FILES:
        shutil.copy(model_dir / name, out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
