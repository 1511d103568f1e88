"""Two torchrun-like rank processes for the DDP test.

Run as ``python -m tests.unit.ddp_worker FOLDER SETTINGS_JSON`` in a fresh interpreter, so
the spawned ranks import this module unaffected by the test session's ``sys.path``.
"""
from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.multiprocessing

from distill_core.safe_files import write_safetensors
from distill_core.training.cli import run
from distill_core.training.lora import lora_state_dict

WORLD_SIZE = 2


def distill_rank(rank: int, world_size: int, port: int, folder: str, settings: dict) -> None:
    """Set torchrun's environment, run the headless CLI body, save this rank's LoRAs (every role)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different initial LoRA per rank: the loop must broadcast rank 0's
    summary = run(settings)
    tensors = {f"{role}.{key}": value for role, loraset in summary.trainer.adapters.items()
               for key, value in lora_state_dict(loraset).items()}
    write_safetensors(os.path.join(folder, f"rank{rank}.safetensors"), tensors, {"world_size": str(summary.world_size)})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    folder, settings = sys.argv[1], json.loads(sys.argv[2])
    torch.multiprocessing.spawn(distill_rank, args=(WORLD_SIZE, free_port(), folder, settings), nprocs=WORLD_SIZE)
