"""ONNX graph passes over exported encoders (onnx-ir / onnxscript), torch-free.

The passes turn an exported masked model plus its pruning manifest into a physically smaller
one: pruned heads and rows are sliced away, block-sparse linears become ``BlockSparseLinear``
nodes. This package must never import torch (pinned by ``tests/test_layout.py``), so it runs on
deployment hosts that have only onnx and onnxruntime.
"""
