"""Multi-process training under `accelerate launch` (or torchrun): DDP for R-SFT, one writer for everything else.

Every process loads the model and trains on its share of each batch (gradients are averaged by DDP, and the stop
decisions use the worst loss over all processes, so every process takes the same steps). Stages that write files
(deltas, merges, export, evaluation) run on the main process only; the others wait at a barrier and then read what it
wrote, so all processes continue from the same model.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ..core.errors import MergeEditError


class Distributed:
    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        if self.world_size > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            check_supported(self.accelerator, self.world_size)

    @property
    def enabled(self) -> bool:
        return self.accelerator is not None

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def device(self, default):
        return self.accelerator.device if self.accelerator is not None else default

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @contextmanager
    def main_first(self) -> Iterator[bool]:
        """The block runs on the main process; the others wait for it, then go on (yielding False)."""
        try:
            yield self.is_main
        finally:
            self.barrier()


def check_supported(accelerator, world_size: int) -> None:
    """R-SFT runs under DDP only (every process holds whole parameters, which the delta writer and the main-process
    stages read). Refuse, in one line, what would otherwise go wrong quietly:

    - `accelerate launch --use_fsdp` (or --use_deepspeed) where accelerate cannot honour it: accelerate 1.16 selects FSDP
      only on GPU-like devices, so on CPU every launched process comes up alone (DistributedType.NO, one process) and N
      copies would train and write the same run folder;
    - FSDP and DeepSpeed themselves: FSDP shards each parameter across processes (its views are partial outside the
      forward pass) and DeepSpeed through accelerate needs model and optimizer prepared together, neither of which the
      R-SFT loop does yet. See README, "Training on several devices".
    """
    kind = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
    if accelerator.num_processes != world_size:
        raise MergeEditError(
            f"the launcher started {world_size} processes but accelerate set up {accelerator.num_processes} ({kind}): on this machine accelerate "
            "cannot run the requested backend (FSDP and DeepSpeed need GPUs in accelerate); launch with DDP instead: accelerate launch --cpu "
            "--num_processes N (or --multi_gpu on GPUs)"
        )
    if kind in ("FSDP", "DEEPSPEED"):
        raise MergeEditError(
            f"R-SFT under {kind} is not supported yet (it trains under DDP: every process holds whole parameters); "
            "launch with --multi_gpu (or --cpu) instead of --use_fsdp/--use_deepspeed"
        )
