"""Run by ``torchrun`` from tests/test_ddp.py: one step-1 run on this rank, stopped or resumed.

argv: CONFIG_JSON OUT MODE [STOP_STEP], MODE one of full, stop, resume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from pipeline.config import PruneConfig
from pipeline.pruning.pruner import Pruner
from pipeline.trainloop import Interrupted


def main() -> None:
    cfg, out, mode = PruneConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    try:
        if mode == "stop":
            try:
                Pruner(cfg, out, device="cpu").run(stop_at_step=int(sys.argv[4]))
            except Interrupted:
                pass
        else:
            Pruner(cfg, out, device="cpu").run(resume=mode == "resume")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
