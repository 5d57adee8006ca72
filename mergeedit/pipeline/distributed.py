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


class Distributed:
    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        if self.world_size > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()

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
