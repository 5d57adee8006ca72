"""Optional general-ability scores from lm-evaluation-harness on a local-data task (offline).

lm-eval's built-in tasks download from the hub; a task YAML with ``dataset_path: json`` and local ``data_files`` runs
offline with the ``hf`` model backend. lm-eval is an optional extra (`pip install 'mergeedit[lmeval]'`), imported only
here and only when a task is run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError

LMEVAL_EXTRA = "pip install 'mergeedit[lmeval]' (lm-eval[hf]==0.4.13)"


def import_lm_eval():
    # Offline: local data files only, never a hub lookup for the dataset.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MergeEditError(f"--lm-eval-task needs lm-evaluation-harness, which is not installed: {LMEVAL_EXTRA}") from None
    return lm_eval, TaskManager


def localize_task(task_yaml: Path, folder: Path) -> str:
    """Copy `task_yaml` into `folder` with relative data_files made absolute (against the YAML's own folder).

    Returns the task name. lm-eval hands data_files to `datasets.load_dataset`, which would resolve them against the
    current directory instead.
    """
    import yaml

    task_yaml = Path(task_yaml)
    if not task_yaml.is_file():
        raise MergeEditError(f"--lm-eval-task {task_yaml}: no such file; pass an lm-eval task YAML with dataset_path: json and local data_files")
    try:
        task = yaml.safe_load(task_yaml.read_text())
    except yaml.YAMLError as exc:
        raise MergeEditError(f"{task_yaml}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(task, dict) or not isinstance(task.get("task"), str):
        raise MergeEditError(f"{task_yaml}: an lm-eval task YAML needs a 'task: NAME' key")
    files = (task.get("dataset_kwargs") or {}).get("data_files")
    if task.get("dataset_path") != "json" or not files:
        raise MergeEditError(f"{task_yaml}: only local-data tasks run offline; set dataset_path: json and dataset_kwargs.data_files")

    def absolute(p):
        if isinstance(p, list):
            return [absolute(x) for x in p]
        path = Path(p) if Path(p).is_absolute() else task_yaml.resolve().parent / p
        if not path.is_file():
            raise MergeEditError(f"{task_yaml}: data file {p} not found (looked at {path})")
        return str(path)

    task["dataset_kwargs"]["data_files"] = {k: absolute(v) for k, v in files.items()} if isinstance(files, dict) else absolute(files)
    (Path(folder) / task_yaml.name).write_text(yaml.safe_dump(task, sort_keys=False))
    return task["task"]


def run_lm_eval_task(model_folder: Path, task_yaml: Path, *, limit: Optional[int] = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """``{"task", "metrics": {name: value}, "samples"}`` of one local task on one Hugging Face model folder."""
    lm_eval, TaskManager = import_lm_eval()
    with tempfile.TemporaryDirectory(prefix="mergeedit-lmeval-") as tmp:
        name = localize_task(task_yaml, Path(tmp))
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_folder), "dtype": "float32"},
            tasks=[name],
            task_manager=TaskManager(include_path=tmp),
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=False,
            bootstrap_iters=0,
        )
    scores = results["results"][name]
    metrics = {k.split(",")[0]: v for k, v in scores.items() if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    samples = results.get("n-samples", {}).get(name, {}).get("effective")
    return {"task": name, "yaml": str(task_yaml), "metrics": metrics, "samples": samples}
