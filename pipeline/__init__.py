"""PyTorch stage: data, models and adapters, dense fine-tuning (the teacher), and pruning.

Modules import torch lazily where they can, so task and metric helpers stay usable without it.
"""
