"""Deployment stage: parity checks against the PyTorch reference, latency benchmarks,
regression reports and serving of the optimized ONNX/TensorRT artifact."""
