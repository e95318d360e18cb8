"""``python -m mlpruning.cli`` and ``torchrun -m mlpruning.cli``."""

from mlpruning.cli.main import main

main()
