"""Multi-process training under `accelerate launch` (or torchrun): shared R-SFT steps, one writer for everything else.

Every process loads the model and computes its share of each step (editing.collective: the gradients are summed and
the losses gathered, so every process takes the same steps and applies the same update). Stages that write files
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
        check_launch(os.environ)
        if self.world_size > 1:
            import torch
            from accelerate import Accelerator

            # without a GPU, accelerate sets up several CPU processes (gloo) only when told so: under torchrun it would
            # otherwise come up as one process (DistributedType.NO), which check_supported refuses
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            check_supported(self.accelerator, self.world_size)

    @property
    def enabled(self) -> bool:
        return self.accelerator is not None

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def collective(self):
        """The processes' sum for R-SFT's steps (editing.collective.ProcessGroup); None in one process."""
        if self.accelerator is None:
            return None
        from ..editing.collective import ProcessGroup

        return ProcessGroup(self.accelerator.device)

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


def launched_main() -> bool:
    """Whether this is the launch's main process (RANK 0, or no launcher): the one that prints progress and results."""
    return os.environ.get("RANK", "0") == "0"


def check_launch(env) -> None:
    """What the launcher's environment asks for, refused where the run would quietly do something else:

    - `accelerate launch --use_fsdp` / `--use_deepspeed` (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED): the processes
      would come up data-parallel on CPU (R-SFT sets accelerate up for CPU processes), not sharded as asked;
    - `accelerate launch --cpu --num_processes N` (N > 1) without an MPI host file starts ONE process: accelerate runs
      several CPU processes only through mpirun. It sets the rendezvous address for the N asked for, but no
      WORLD_SIZE, so that one process would train alone (with OMP_NUM_THREADS=1, on one core) while the user expects N.
    """
    for key, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if env.get(key, "").lower() in ("1", "true", "yes"):
            raise MergeEditError(_UNSUPPORTED.format(kind=name))
    if "WORLD_SIZE" not in env and "MASTER_ADDR" in env and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        raise MergeEditError(
            "accelerate launch --cpu started one process, not the several asked for (accelerate starts several CPU processes only "
            "through MPI, --mpirun_hostfile); launch them with torchrun: torchrun --standalone --nproc_per_node N -m mergeedit.cli run RECIPE"
        )


def check_supported(accelerator, world_size: int) -> None:
    """R-SFT runs data-parallel only (every process holds whole parameters, which the delta writer and the main-process
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
            "cannot run the requested backend (FSDP and DeepSpeed need GPUs in accelerate); launch data-parallel instead: torchrun "
            "--standalone --nproc_per_node N -m mergeedit.cli run RECIPE (or accelerate launch --multi_gpu on GPUs)"
        )
    if kind in ("FSDP", "DEEPSPEED"):
        raise MergeEditError(_UNSUPPORTED.format(kind=kind))


_UNSUPPORTED = (
    "R-SFT under {kind} is not supported yet (it trains data-parallel: every process holds whole parameters); launch with "
    "--multi_gpu instead of --use_fsdp/--use_deepspeed, or on CPU with torchrun --standalone --nproc_per_node N -m mergeedit.cli run RECIPE"
)
