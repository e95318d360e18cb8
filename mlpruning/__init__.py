"""mlpruning: multi-level structured pruning (heads, rows, blocks) for BERT-class encoders.

The distribution ships four packages: ``mlpruning`` (this one: version, errors, the CLI),
``pipeline`` (the PyTorch stage), ``graph_passes`` (torch-free ONNX passes) and ``deploy``
(verification, benchmarks, reports, serving). Importing this package never imports torch.
"""

__version__ = "0.1.0"
