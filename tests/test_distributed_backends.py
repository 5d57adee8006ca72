"""R-SFT under several processes runs data-parallel only; FSDP, DeepSpeed and an accelerate launch that starts one
CPU process where several were asked are refused in one line instead of going wrong.

Evidence behind the refusal on this machine (torch 2.13 CPU, accelerate 1.16): `accelerate launch --use_fsdp` without a
GPU brings each process up alone (DistributedType.NO, num_processes 1), so N copies would train and write the same run;
torch's own FSDP1 refuses CPU ("FSDP needs a non-CPU accelerator device, but no accelerator device is detected").
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_pipeline import _recipe, tiny_model  # noqa: F401 - tiny_model is a fixture used by name

from mergeedit.core.errors import MergeEditError
from mergeedit.pipeline.distributed import check_launch, check_supported


def _accelerator(kind: str, processes: int):
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=processes)


def test_ddp_is_accepted():
    check_supported(_accelerator("MULTI_CPU", 2), 2)
    check_supported(_accelerator("MULTI_GPU", 8), 8)


@pytest.mark.parametrize(
    "kind,processes,needles",
    [
        ("NO", 1, ["started 2 processes but accelerate set up 1 (NO)", "torchrun --standalone --nproc_per_node N"]),
        ("FSDP", 2, ["R-SFT under FSDP is not supported yet", "--multi_gpu"]),
        ("DEEPSPEED", 2, ["R-SFT under DEEPSPEED is not supported yet"]),
    ],
)
def test_what_ddp_is_not_is_refused_in_one_line(kind, processes, needles):
    with pytest.raises(MergeEditError) as info:
        check_supported(_accelerator(kind, processes), 2)
    for needle in needles:
        assert needle in str(info.value)


def test_fsdp_launch_on_cpu_is_refused_before_anything_is_written(tmp_path, tiny_model):  # noqa: F811
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    recipe = _recipe(tmp_path, tiny_model, eval={"generation": False})
    proc = subprocess.run(
        [launcher, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--use_fsdp", "--fsdp_use_orig_params", "true", "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false",
         "-m", "mergeedit.cli", "run", str(recipe)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines, proc.stderr[-3000:]
    # the launch asked for FSDP (ACCELERATE_USE_FSDP): refused before accelerate is set up (it would come up data-parallel)
    assert all("R-SFT under FSDP is not supported yet" in line for line in lines), lines
    assert not (tmp_path / "run").exists()


def test_launches_that_would_quietly_do_something_else_are_refused():
    """What `accelerate launch --cpu --num_processes 2` hands its one process (measured with accelerate 1.16): the
    rendezvous address for two, no WORLD_SIZE. torchrun's processes (WORLD_SIZE set) and a plain run pass."""
    alone = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "OMP_NUM_THREADS": "1"}
    with pytest.raises(MergeEditError, match="started one process, not the several asked for.*torchrun --standalone --nproc_per_node N"):
        check_launch(alone)
    check_launch({**alone, "WORLD_SIZE": "2", "RANK": "0"})
    check_launch({})
    check_launch({"ACCELERATE_USE_CPU": "True"})  # `accelerate launch --cpu` of one process
    for key, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        with pytest.raises(MergeEditError, match=f"R-SFT under {kind} is not supported yet"):
            check_launch({key: "true", "WORLD_SIZE": "2"})
