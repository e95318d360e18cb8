"""The bottom layer: errors, atomic writes, JSON reading and the artifact contract.

Standard library and numpy only. Every other package (``pipeline``, ``graph_passes``,
``deploy``, ``mlpruning.cli``) may import it; it imports none of them.
"""
