"""The top layer: the ``mlpruning`` command line and the ``run`` orchestrator.

``python -m mlpruning.cli`` (and ``torchrun -m mlpruning.cli``) runs :func:`main`, as does the
``mlpruning`` console script.
"""

from mlpruning.cli.main import app, main

__all__ = ["app", "main"]
