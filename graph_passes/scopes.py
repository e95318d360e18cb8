"""Which PyTorch module produced an ONNX node: the one place that reads exporter name scopes.

The two torch.onnx exporters record module provenance differently:

- TorchScript (``dynamo=False``) names each node after its module path, with ``/`` separators
  and the op last: ``/bert/encoder/layer.0/attention/self/query/MatMul`` came from module
  ``bert.encoder.layer.0.attention.self.query``. Initializers get exporter names
  (``onnx::MatMul_505``).
- dynamo (``dynamo=True``) names nodes ``node_MatMul_82`` and renames weights (``val_83``,
  transposed to [in, out] by its constant folding), but stores the module stack in the node
  metadata ``pkg.torch.onnx.name_scopes``: ``['', 'bert', ..., 'bert.encoder.layer.0
  .attention.self.query', 'linear']``; the last entry is the op's own name, the one before
  it the innermost module.

``module_path`` returns the innermost module path (dot-separated, as ``named_modules`` spells
it) for either form, so no pass ever looks a weight up by initializer name.
"""

from __future__ import annotations

import ast
from collections import defaultdict

import onnx_ir as ir

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def module_path(node: ir.Node) -> str | None:
    """The innermost module path of ``node``, or None when the exporter recorded none."""
    scopes = node.metadata_props.get(NAME_SCOPES_KEY)
    if scopes:
        try:
            entries = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            return None
        return entries[-2] if isinstance(entries, list) and len(entries) >= 2 else None
    name = node.name or ""
    if name.startswith("/") and name.count("/") >= 2:
        return name[1:].rsplit("/", 1)[0].replace("/", ".")
    return None


def nodes_by_module(graph: ir.Graph) -> dict[str, list[ir.Node]]:
    """Every node of the main graph grouped by its innermost module path, in graph order."""
    groups: dict[str, list[ir.Node]] = defaultdict(list)
    for node in graph:
        path = module_path(node)
        if path is not None:
            groups[path].append(node)
    return dict(groups)


def module_prefix(prefix: str, layers: str, layer: int) -> str:
    """Module path of one encoder layer: ``bert.encoder.layer.3`` (no prefix for a bare encoder)."""
    return f"{prefix}.{layers}.{layer}" if prefix else f"{layers}.{layer}"
