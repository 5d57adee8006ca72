"""The `mergeedit` command line: parses arguments, calls the library, prints with rich. No merge logic lives here."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .core.errors import MergeEditError
from .core.units import format_size, parse_size

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge editing by R-SFT + model merging, and a streaming merge engine.")
console = Console(stderr=True)
out = Console()
if not out.is_terminal:  # piped tables should not squash tensor names into 80 columns
    out = Console(width=200)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _tensor_progress(label: str, total_bytes: int, tensors: int):
    """A live bar of bytes and tensors written; yields the executor's per-tensor progress callback."""
    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.fields[tensors]} tensors"), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=total_bytes, tensors=f"0/{tensors}")
        done = [0]

        def on_tensor(t, nbytes):
            done[0] += 1
            bar.update(task, advance=nbytes, tensors=f"{done[0]}/{tensors}")

        yield on_tensor


def _merge_with_progress(plan, out_dir: Path, options, est) -> None:
    """Run the merge with a live progress bar, then print the closing summary."""
    from .merging.merge import write_merge

    with _tensor_progress("merging", est.bytes_written, est.tensors) as on_tensor:
        report = write_merge(plan, out_dir, options, progress=on_tensor)
    summary = Table(show_header=False, box=None)
    summary.add_row("output", str(out_dir))
    summary.add_row("tensors", f"{est.tensors} in {est.shards} shard(s)")
    if report.resumed_shards:
        summary.add_row("resumed", f"{report.resumed_shards} of {est.shards} shard(s) reused from the interrupted run (sha256 verified)")
    summary.add_row("time", f"{report.seconds:.2f} s")
    summary.add_row("read", f"{format_size(report.bytes_read)} ({format_size(report.bytes_read / max(report.seconds, 1e-9))}/s)")
    summary.add_row("written", f"{format_size(report.bytes_written)} ({format_size(report.bytes_written / max(report.seconds, 1e-9))}/s)")
    summary.add_row("peak memory", f"{format_size(report.peak_rss)} RSS (budget {format_size(report.budget)}, in flight at most {format_size(report.budget_high_water)})")
    if report.fused_blocks or report.kernel_failure:
        kernels = f"fused kernels for {report.fused_blocks:,} blocks" if report.fused_blocks else "eager"
        summary.add_row("kernels", kernels + (f" (compiled kernels not used, eager instead: {report.kernel_failure})" if report.kernel_failure else ""))
    out.print(summary)


@app.command()
def merge(
    config: Path = typer.Argument(..., help="mergekit-style YAML merge config."),
    out_dir: Path = typer.Argument(..., help="Output model folder (created atomically)."),
    out_shard_size: str = typer.Option("5G", "--out-shard-size", help="Max bytes per output shard (K/M/G decimal, Ki/Mi/Gi binary)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Max bytes in flight (default: 2G or a quarter of RAM, whichever is less)."),
    random_seed: int = typer.Option(0, "--random-seed", help="Seed for randomized methods (DARE); same seed, same bytes."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype (float32, bfloat16, float16); overrides out_dtype in the config."),
    copy_tokenizer: bool = typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer", help="Copy tokenizer files from the base or tokenizer_source."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists (only once the new merge is complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and resource estimate without reading tensor data."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickled .bin/.pt inputs (loaded with torch.load(weights_only=True), converted to safetensors once)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted merge into OUT_DIR: shards it finished (sha256 verified) are kept, the rest are written."),
    kernels: str = typer.Option(
        "auto", "--kernels",
        help="fused: compile the TIES/DARE/task-arithmetic formula into one loop (torch.compile; a few seconds, needs a C++ compiler; identical bytes); eager: never; auto: fused for merges of 2^29+ elements.",
    ),
    float32_compute: bool = typer.Option(
        False, "--float32-compute",
        help="Compute in float32 and round once, where mergekit computes a bfloat16/float16 config's TIES/DARE/task-arithmetic arithmetic in that dtype (more precise; not mergekit's bytes).",
    ),
    keep_intermediates: Optional[Path] = typer.Option(
        None, "--keep-intermediates",
        help="Merge graphs (several YAML documents): also write each named merge to DIR/<name>, as mergekit-multi does; by default they are never written.",
    ),
    part: Optional[str] = typer.Option(
        None, "--part", metavar="I/N",
        help="Compute only the output shards of worker I of N (1-based: 1/4 .. 4/4; balanced by bytes), beside OUT_DIR; then --assemble.",
    ),
    assemble: bool = typer.Option(False, "--assemble", help="Check that every --part is finished and verified (sha256), then write OUT_DIR from them atomically."),
    ray: bool = typer.Option(False, "--ray", help="Run the parts as Ray tasks on the cluster ray.init() connects to (or a local one), then assemble (needs mergeedit[ray])."),
    workers: Optional[int] = typer.Option(None, "--workers", help="With --ray: number of parts (default: the cluster's CPUs, at most the number of shards)."),
) -> None:
    """Merge models as CONFIG says and write a Hugging Face model folder to OUT_DIR.

    CONFIG may hold several YAML documents (mergekit-multi's format): named merges that later ones read by name.
    """
    from .core.memory import default_budget
    from .merging.executor import check_kernels
    from .merging.merge import MergeOptions, estimate, load_plan

    check_kernels(kernels)  # before the plan is loaded: a typo costs no header reads
    options = MergeOptions(
        out_shard_size=parse_size(out_shard_size, "--out-shard-size"),
        memory_budget=parse_size(memory_budget, "--memory-budget") if memory_budget else default_budget(),
        random_seed=random_seed,
        out_dtype=dtype,
        copy_tokenizer=copy_tokenizer,
        overwrite=overwrite,
        resume=resume,
        allow_pickle=allow_pickle,
        kernels=kernels,
        float32_compute=float32_compute,
    )
    plan = load_plan(config, options)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if part is not None or assemble or ray or workers is not None:
        _partitioned(config, plan, out_dir, options, part, assemble, ray, workers, dry_run, keep_intermediates is not None)
        return
    est = estimate(plan, options)
    _note_tie_order_memory(est, options)
    if dry_run:
        _print_dry_run(plan, est, options, out_dir, keep_intermediates)
        return
    if keep_intermediates is not None:
        from .merging.graph import write_intermediates

        plan = write_intermediates(config, options, keep_intermediates, lambda p, d: _merge_with_progress(p, d, options, estimate(p, options)))
        est = estimate(plan, options)
    _merge_with_progress(plan, out_dir, options, est)


def _partitioned(
    config: Path, plan, out_dir: Path, options, part: Optional[str], assemble: bool, ray: bool, workers: Optional[int], dry_run: bool, keep_intermediates: bool,
) -> None:
    """--part I/N, --assemble, --ray [--workers N]: one of them, then the library does the work."""
    chosen = [name for name, on in (("--part", part is not None), ("--assemble", assemble), ("--ray", ray)) if on]
    if workers is not None and not ray:
        _fail("--workers sets the number of Ray tasks; use it with --ray (a --part I/N names its N itself)")
    if len(chosen) > 1:
        _fail(f"{' and '.join(chosen)} are separate steps; give one of them")
    other_mode = dry_run or keep_intermediates
    if other_mode and not (part is not None and dry_run and not keep_intermediates):
        _fail(f"{chosen[0]} cannot be combined with {'--keep-intermediates' if keep_intermediates else '--dry-run'}")
    if part is not None:
        from .merging.partition import parse_part, plan_part, write_part

        i, n = parse_part(part)
        layout = plan_part(plan, options, i, n)
        if dry_run:  # every part's share, so a job array can be sized before it is submitted
            table = Table(title=f"{len(layout.shards)} shard(s) dealt out to {n} part(s)")
            for col in ("part", "shards", "tensors", "bytes"):
                table.add_column(col)
            for k in range(1, n + 1):
                mine = plan_part(plan, options, k, n)
                names = ", ".join(s.filename for s in mine.mine) or "(none)"
                table.add_row(f"{k}/{n}" + (" *" if k == i else ""), names, str(mine.tensors), format_size(mine.nbytes))
            out.print(table)
            return
        with _tensor_progress(f"part {i}/{n}", layout.nbytes, layout.tensors) as on_tensor:
            report = write_part(plan, out_dir, options, i, n, progress=on_tensor)
        reused = f", {report.resumed_shards} reused (sha256 verified)" if report.resumed_shards else ""
        if not report.shards:
            reused = f" (more parts than the {len(layout.shards)} shard(s): a smaller --out-shard-size gives every part work)"
        out.print(
            f"part {i}/{n}: {len(report.shards)} of {len(layout.shards)} shard(s), {format_size(report.bytes_out)}{reused}, "
            f"{report.seconds:.2f} s -> {report.folder}", highlight=False,
        )
        return
    if assemble:
        from .merging.partition import assemble as assemble_parts

        report = assemble_parts(plan, out_dir, options)
        out.print(f"assembled {report.of} part(s): {report.shards} shard(s), {format_size(report.bytes_out)} verified and linked in {report.seconds:.2f} s -> {out_dir}", highlight=False)
        return
    from .pipeline.cluster import run_on_ray

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[state]}"), console=console, transient=False) as bar:
        tasks: dict[int, object] = {}

        def on_part(i: int, n: int, done: int, total: int, state: str) -> None:
            if i not in tasks:
                tasks[i] = bar.add_task(f"part {i}/{n}", total=max(total, 1), state="")
            bar.update(tasks[i], completed=done if total else 1, state=state)

        report = run_on_ray(config, out_dir, options, workers, on_part)
    out.print(
        f"ray: {report.of} part(s) in {report.part_seconds:.2f} s, assembled in {report.assemble.seconds:.2f} s: "
        f"{report.assemble.shards} shard(s), {format_size(report.assemble.bytes_out)} -> {out_dir}", highlight=False,
    )


def _note_tie_order_memory(est, options) -> None:
    """One line when mergekit's tie order (ties/breadcrumbs/sce, tensors up to 2^27 elements) may need more memory
    than --memory-budget: it is held outside the budget, so the bytes stay the same under any budget."""
    if est.selection_bytes > options.memory_budget:
        console.print(
            f"[yellow]note:[/] where magnitudes tie at a top-k boundary, reproducing mergekit's tie order takes up to "
            f"{format_size(est.selection_bytes)} for the largest tensor, outside --memory-budget "
            f"{format_size(options.memory_budget)} (the output bytes do not depend on the budget)",
            highlight=False, soft_wrap=True,
        )


def _print_dry_run(plan, est, options, out_dir: Path, keep_dir: Optional[Path]) -> None:
    """--dry-run: every output tensor with its inputs and row chunks, then the work and memory estimate."""
    from .core.memory import current_rss

    table = Table(title=f"{plan.method.name} merge of {len(plan.models)} models -> {out_dir}", show_lines=False)
    for col in ("output tensor", "shape", "dtype", "inputs", "chunks"):
        table.add_column(col)
    for t, chunks in zip(plan.tensors, est.chunks):
        inputs = ", ".join(plan.models[src.model].ref + ("*" if k == t.base else "") for k, src in enumerate(t.sources))
        table.add_row(t.name, "x".join(map(str, t.shape)), str(t.out_dtype).removeprefix("torch."), inputs, str(chunks))
    out.print(table)
    out.print(f"* base model. {est.tensors} tensors in {est.shards} shard(s); layers out: {plan.layers_out}")
    out.print(f"read {format_size(est.bytes_read)}, write {format_size(est.bytes_written)} (disk needed: {format_size(est.bytes_written)})")
    out.print(
        f"memory: budget {format_size(options.memory_budget)}, estimated peak {format_size(current_rss() + est.peak_in_flight)} "
        f"(process {format_size(current_rss())} + in flight {format_size(est.peak_in_flight)}); {est.chunked_tensors} tensor(s) in row chunks"
    )
    if est.selection_bytes:
        out.print(f"tie order: up to {format_size(est.selection_bytes)} more, outside the budget, only where magnitudes tie at a top-k boundary")
    _print_merge_graph(plan, out_dir, keep_dir)


def _print_merge_graph(plan, out_dir: Path, keep_dir: Optional[Path]) -> None:
    """--dry-run of a merge graph: the named merges the final one reads, in the order they are computed."""
    from .merging.graph import upstream_merges

    steps = upstream_merges(plan)
    if not steps:
        return
    table = Table(title="merge graph", show_lines=False)
    for col in ("merge", "method", "inputs", "tensors", "output"):
        table.add_column(col)
    for name, p in steps + [("(final)", plan)]:
        where = str(out_dir) if p is plan else (str(keep_dir / name) if keep_dir else "computed as read, not written")
        table.add_row(name, p.method.name, ", ".join(m.ref for m in p.models), str(len(p.tensors)), where)
    out.print(table)


@app.command()
def inspect(model: str = typer.Argument(..., help="Model folder, .safetensors file or hub id.")) -> None:
    """Summarise a model from its safetensors headers alone (no tensor data is read)."""
    from .io.model_summary import summarize

    s = summarize(model)
    table = Table(show_header=False, box=None)
    for key, value in s.rows():
        table.add_row(f"[bold]{key}", value)
    out.print(table)


@app.command()
def verify(folder: Path = typer.Argument(..., help="A folder written by mergeedit merge or run, a run directory, or a partitioned merge's OUT.")) -> None:
    """Check every file of FOLDER against its sha256 manifest, and the deltas its edit ledger names against their
    sha256 (a partitioned merge not yet assembled: every finished part's shards); name the first bad file (exit status 2)."""
    from .io.parts import parts_folder, verify_parts
    from .pipeline.ledger import verify_target

    if not os.path.lexists(folder) and parts_folder(folder).is_dir():  # a partitioned merge not assembled yet
        for record, n in verify_parts(folder):
            out.print(f"[green]ok[/]: part {record.label}: {n} shard(s) in {record.folder} match its record", highlight=False)
        out.print(f"{folder} is not assembled yet: run mergeedit merge CONFIG {folder} --assemble once every part is finished", highlight=False)
        return
    for line in verify_target(folder):
        out.print(f"[green]ok[/]: {line}", highlight=False, soft_wrap=True)


@app.command()
def edits(
    target: Path = typer.Argument(..., help="A run directory or a model folder it exported (or a revert wrote)."),
    json_out: bool = typer.Option(False, "--json", help="Print the ledger's entries as one JSON list instead of a table."),
) -> None:
    """Print the edit ledger: every batch of edits in the model, its delta's sha256, merge and scores; and reverts."""
    import json

    from .pipeline.ledger import ledger_rows, read_ledger

    entries = read_ledger(target)
    if json_out:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    rows = ledger_rows(entries)
    table = Table(title=f"edit ledger of {target}")
    for col in rows[0] if rows else ("batch",):
        table.add_column(col)
    for row in rows:
        table.add_row(*row.values())
    out.print(table)


@app.command()
def revert(
    run_dir: Path = typer.Argument(..., help="The run directory (it holds ledger.jsonl and stages/)."),
    out_dir: Path = typer.Argument(..., help="Where the model without those batches goes (created atomically)."),
    batch: list[int] = typer.Option(..., "--batch", help="A batch number from `mergeedit edits RUN` to take back; repeatable."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists (only once the new model is complete)."),
    tolerance: float = typer.Option(0.1, "--tolerance", help="How far (mean teacher-forced score) the reverted facts may stay from their pre-edit scores, and the kept ones from their run scores."),
) -> None:
    """Write RUN's model without batch(es) K to OUT_DIR (anchored: re-merge, no training; chained: replay from the batch
    before K, reusing cached stages), score it, and record the revert in the ledger."""
    from .pipeline.revert import revert_run, revert_summary

    result = revert_run(run_dir, batch, out_dir, overwrite=overwrite, tolerance=tolerance, reporter=_RichReporter())
    for line in revert_summary(result):
        out.print(line, highlight=False, soft_wrap=True)
    out.print(f"[green]model:[/] {result.out} (Hugging Face folder with its ledger and model card)")


@app.command("extract-lora")
def extract_lora(
    model: str = typer.Argument(..., help="The fine-tuned or edited model (folder, .safetensors file, hub id, or model+adapter)."),
    out_dir: Path = typer.Argument(..., help="Output adapter folder (created atomically): adapter_config.json + adapter_model.safetensors."),
    base: str = typer.Option(..., "--base", help="The model MODEL was fine-tuned from: same tensor names and shapes."),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank of every changed matrix (with --sv-energy: the largest rank)."),
    rank_for: list[str] = typer.Option([], "--rank-for", help="REGEX=R: rank R for modules whose name matches REGEX (first match wins); repeatable."),
    sv_energy: Optional[float] = typer.Option(None, "--sv-energy", help="Per module, the smallest rank keeping this share of the delta's squared singular values (e.g. 0.99)."),
    skip: list[str] = typer.Option([], "--skip", help="REGEX: leave matching tensors out of the adapter even if they changed; repeatable."),
    dtype: str = typer.Option("float32", "--dtype", help="dtype of the stored factors (float32, bfloat16, float16)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Max bytes the SVDs in flight hold together; more budget, more tensors side by side (default: 2G or a quarter of RAM, raised to the largest tensor's need when it fits in half the RAM)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists (only once the new adapter is complete)."),
) -> None:
    """Write MODEL - BASE as a PEFT LoRA adapter: a truncated SVD of every changed weight matrix, tensor by tensor."""
    from .merging.extract_lora import ExtractOptions, extract_lora, parse_rank_rules

    options = ExtractOptions(
        rank=rank, rank_for=parse_rank_rules(rank_for), sv_energy=sv_energy, skip=list(skip), dtype=dtype,
        memory_budget=parse_size(memory_budget, "--memory-budget") if memory_budget else None, overwrite=overwrite,
    )
    with Progress(TextColumn("[bold]decomposing"), BarColumn(), TextColumn("{task.completed}/{task.total} matrices"), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("svd", total=None)
        report = extract_lora(model, base, out_dir, options, progress=lambda name, i, n: bar.update(task, completed=i, total=n))
    summary = Table(show_header=False, box=None)
    ranks = sorted({m.rank for m in report.modules})
    summary.add_row("adapter", str(out_dir))
    summary.add_row("modules", f"{len(report.modules)} changed matrices, rank {', '.join(map(str, ranks))}; {report.unchanged} tensors unchanged")
    if report.skipped_changed:
        summary.add_row("left out", f"{len(report.skipped_changed)} changed tensors matching --skip (e.g. {report.skipped_changed[0]})")
    summary.add_row("error", f"relative Frobenius error {report.relative_error:.3e} (per module in {out_dir / 'extract_lora.json'})")
    summary.add_row("size", f"{format_size(report.adapter_bytes)} ({report.dtype})")
    summary.add_row("time", f"{report.seconds:.2f} s, peak memory {format_size(report.peak_rss)} RSS (budget {format_size(report.budget)})")
    out.print(summary)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo-output"), "--out", help="Where the demo's models and merges go."),
) -> None:
    """Build three small Llama-style models (no download), TIES-merge them, and check the result loads."""
    from .merging.merge import MergeOptions, estimate, load_plan
    from .models.demo import build_inputs, check_loads

    inputs = out_dir / "inputs"
    out.print(f"[bold]1/3[/] building a base and two fine-tunes in {inputs} (3 shards each)")
    config = build_inputs(inputs)
    out.print(f"[bold]2/3[/] merging with {config}:\n" + config.read_text())
    options = MergeOptions(out_shard_size=10**7, overwrite=True)
    plan = load_plan(config, options)
    merged = out_dir / "merged"
    _merge_with_progress(plan, merged, options, estimate(plan, options))
    out.print("[bold]3/3[/] loading the merge with transformers AutoModelForCausalLM.from_pretrained")
    facts = check_loads(merged, inputs)
    out.print(
        f"loaded {facts['parameters']:,.0f} parameters; TIES changed {facts['changed_fraction']:.1%} of them; "
        f"max logit shift from the base {facts['logit_shift_vs_base']:.4f}"
    )
    out.print(f"[green]done[/]: {merged} is a Hugging Face model folder; try `mergeedit inspect {merged}`")


class _RichReporter:
    """Shows stage progress: training (edits learned / total, loss, steps) and merging (tensors)."""

    def __init__(self) -> None:
        self._bar: Optional[Progress] = None
        self._task = None

    def _ensure(self, description: str, total: int) -> None:
        if self._bar is None:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True, disable=not console.is_terminal)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, info="")

    def stage(self, name: str, cached: bool, detail: str = "") -> None:
        self.training_done()
        state = "[dim]cached[/]" if cached else "[bold]running[/]"
        console.print(f"{state} {name}" + (f" [dim]({detail})[/]" if detail else ""), highlight=False)

    def training(self, learned: int, total: int, loss: float, steps: int) -> None:
        if not console.is_terminal and steps % 10 == 0 and steps != getattr(self, "_last_logged", None):
            self._last_logged = steps
            console.print(f"  step {steps}: loss {loss:.4f}, {learned}/{total} edits learned", highlight=False)
        self._ensure("  training", total)
        self._bar.update(self._task, completed=learned, total=total, info=f"{learned}/{total} edits learned, loss {loss:.4f}, {steps} steps")

    def merging(self, done: int, total: int) -> None:
        self._ensure("  merging", total)
        self._bar.update(self._task, completed=done, total=total, info=f"{done}/{total} tensors")

    def training_done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML: edits -> R-SFT -> merge -> evaluation."),
    force: list[str] = typer.Option([], "--force", help="Redo this stage (e.g. rsft, merge, export, eval) even if cached; repeatable."),
) -> None:
    """Run every stage of RECIPE into its run directory; finished stages are reused, an interrupted run resumes."""
    from .pipeline.distributed import launched_main
    from .pipeline.runner import RecipeRun

    main = launched_main()  # under torchrun the other processes work silently: one set of lines, not N
    if not main:
        import logging

        logging.getLogger("mergeedit").setLevel(logging.ERROR)  # their warnings are the main process's, printed once
    result = RecipeRun(recipe, force=force, reporter=_RichReporter() if main else None).run()
    if not main:
        return
    table = Table(title="edit quality on the final model")
    for col in ("metric", "protocol", "before", "after"):
        table.add_column(col)
    for name, entry in (result.metrics or {}).items():
        before = (result.pre_metrics or {}).get(name, {}).get("value")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(name, entry["protocol"], fmt(before), fmt(entry["value"]))
    if result.metrics:
        out.print(table)
    for ex in result.examples:
        out.print(f"[bold]Q:[/] {ex['prompt']}\n   target: {ex['target']}\n   before: {ex.get('before', '')!r}\n   after:  {ex.get('after', '')!r}", highlight=False)
    learned = [r["learned_fraction"] for r in result.train_reports]
    out.print(
        f"{result.edits} edits in {result.batches} batch(es); learned in training: {', '.join(f'{x:.0%}' for x in learned)}; "
        f"stages run: {len(result.stages_run)}, cached: {len(result.stages_cached)}; {result.seconds:.1f} s"
    )
    for name, p in result.stage_profile.items():
        out.print(f"stage {name}: {p['seconds']:.1f} s, peak RSS {p['peak_rss'] / 2**30:.2f} GiB")
    if result.stage_profile:
        from .pipeline.runner import evaluation_share, outside_stages

        eval_seconds, share = evaluation_share(result)
        out.print(f"evaluation: {eval_seconds:.1f} s of {result.seconds:.1f} s wall time ({share:.0%})")
        out.print(f"outside the stages (loading the model, the retain set's base side, the null space's moments): {outside_stages(result):.1f} s")
    for r in result.train_reports[:1]:
        out.print(f"training forward: {r.get('forward', '')}; precision: {r.get('precision', '')}; compiled: {r.get('compiled', 'false')}")
    spent: dict[str, float] = {}
    for r in result.train_reports:
        for part, seconds in r.get("profile", {}).items():
            spent[part] = spent.get(part, 0.0) + seconds
    if spent:
        out.print("training time: " + ", ".join(f"{part} {seconds:.1f} s" for part, seconds in spent.items()))
    if result.train_reports:
        steps = sum(r.get("steps", 0) for r in result.train_reports)
        sat = sum(sum(r.get("sat_out", [])) for r in result.train_reports)
        out.print(f"training steps: {steps}; edit-epochs sat out (the edit already learned when its epoch began): {sat}")
    for note in result.notes:
        out.print(f"note: {note}")
    out.print(f"[green]model:[/] {result.model_dir} (Hugging Face folder with model card)")


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="Model folder, hub id or built-in name to score."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Edit records file (optional with --lm-eval-task or drift-only runs)."),
    fmt: str = typer.Option("zsre", "--format", help="zsre | counterfact | knowedit | qaedit | mquake | jsonl | csv"),
    reference: Optional[str] = typer.Option(None, "--reference", help="The unedited model: locality compares against it."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N edits."),
    generation: bool = typer.Option(True, "--generation/--no-generation", help="Also score greedy answers by exact match."),
    batch_size: int = typer.Option(16, "--batch-size"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write per-edit records and the aggregate here."),
    drift: bool = typer.Option(True, "--drift/--no-drift", help="With --reference: perplexity drift and next-token KL on generic text."),
    drift_texts: Optional[Path] = typer.Option(None, "--drift-texts", help="JSONL of {prompt, text} lines for drift (default: data/drift/generic.jsonl)."),
    lm_eval_task: Optional[Path] = typer.Option(None, "--lm-eval-task", help="lm-eval task YAML with local data files (needs mergeedit[lmeval]); run on MODEL and --reference."),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="Score only the first N documents of the lm-eval task."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Ask the chat forms (generation, loc_chat) with this system turn, as a recipe's dataset.system_prompt trains (default: none, the template's default left out)."),
) -> None:
    """Score MODEL on edit records: reliability, generalization, locality (vs --reference), portability, exact match;
    general-ability drift vs --reference; optionally a local lm-evaluation-harness task."""
    import json

    from .evaluation.standalone import evaluate_folder

    if dataset is None and lm_eval_task is None and reference is None:
        _fail("nothing to score: pass --dataset FILE, --reference MODEL (drift) or --lm-eval-task TASK_YAML")
    result = evaluate_folder(
        model, dataset, fmt, reference=reference, limit=limit, generation=generation, batch_size=batch_size,
        drift=drift, drift_texts=drift_texts, lm_eval_task=lm_eval_task, lm_eval_limit=lm_eval_limit, system_prompt=system_prompt,
    )
    table = Table(title=f"{model}" + (f" on {dataset.name} ({len(result['records'])} edits)" if dataset else ""))
    for col in ("metric", "protocol", "value", "n"):
        table.add_column(col)
    for name, agg in result["aggregate"].items():
        table.add_row(name, agg["protocol"], "-" if agg["value"] is None else f"{agg['value']:.3f}", str(agg["n"]))
    if "drift" in result:
        d = result["drift"]
        table.add_row("ppl", "drift vs reference", f"{d['ppl']:.3f} (ref {d['ppl_ref']:.3f})", str(d["texts"]))
        table.add_row("ppl_drift_pct", "drift vs reference", f"{d['ppl_drift_pct']:+.2f}%", str(d["texts"]))
        table.add_row("kl", "drift vs reference", f"{d['kl']:.5f}", str(d["prompts"]))
    for who, r in (result.get("lm_eval") or {}).items():
        for metric, value in r["metrics"].items():
            table.add_row(f"{r['task']} {metric}" + (" (reference)" if who == "reference" else ""), "lm-eval", f"{value:.3f}", str(r["samples"] or "-"))
    out.print(table)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
        out.print(f"per-edit results: {json_out}")


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML whose merge is swept."),
    extra_grid: Optional[list[str]] = typer.Argument(None, help="More KEY=V1,V2 grid axes (so --grid a=1,2 b=3,4 works)."),
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,...: a merge parameter and its values (density=0.2,0.5,1); repeatable."),
    validation: Optional[float] = typer.Option(None, "--validation", help="Edits scored: a fraction (< 1) or a count (default: the recipe's sweep.validation, 0.2)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the validation split."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the sweep's JSON here (always at <run dir>/sweep.json)."),
) -> None:
    """Train RECIPE's R-SFT once, merge every grid point, score each on a validation split; mark the Pareto front."""
    import json

    from .pipeline.sweep import SCORES, run_sweep

    result = run_sweep(recipe, list(grid) + list(extra_grid or []), validation=validation, seed=seed, reporter=_RichReporter())
    table = Table(title=f"sweep of {recipe.name}: {len(result.points)} merges scored on {result.validation['size']} of {result.validation['of']} edits")
    for col in [*result.grid, *SCORES, "pareto"]:
        table.add_column(col)
    cell = lambda v: "-" if v is None else (str(v) if isinstance(v, bool) else f"{v:.3g}")  # noqa: E731
    for p in result.points:
        table.add_row(*[cell(p["params"][k]) for k in result.grid], *[cell(p["scores"][k]) for k in SCORES], "[bold green]*[/]" if p["pareto"] else "")
    out.print(table)
    out.print("* on the Pareto front of rel (teacher-forced) vs loc (pre-vs-post); " + f"{result.seconds:.1f} s")
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        out.print(f"sweep results: {json_out}")


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML to check.")) -> None:
    """Check a recipe (schema, dataset, merge references, trainable patterns) without training anything."""
    from .pipeline.planning import plan_recipe

    p = plan_recipe(recipe, probe=False)
    detail = f", {p.trainable_tensors} trainable tensors ({p.trainable_parameters:,} parameters)" if p.trainable_tensors else ""
    out.print(f"[green]ok[/]: {recipe}: {p.edits} edits in {p.batches} batch(es){detail}")
    for note in p.notes:
        out.print(f"note: {note}")


@app.command()
def plan(recipe: Path = typer.Argument(..., help="Recipe YAML to plan.")) -> None:
    """Show a recipe's stages, edits, trainable parameters, bytes to read and write, and estimated memory and disk."""
    from .pipeline.planning import plan_recipe

    p = plan_recipe(recipe)
    table = Table(show_header=False, box=None)
    size = lambda v: "-" if v is None else format_size(v)  # noqa: E731
    count = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
    rows = [
        ("base model", f"{p.base}" + (f" ({p.base_folder})" if p.base_folder else "")),
        ("edits", f"{p.edits} in {p.batches} batch(es), strategy {p.strategy}"),
        ("stages", ", ".join(p.stages)),
        ("model parameters", count(p.model_parameters)),
        ("trainable", f"{count(p.trainable_parameters)} parameters in {count(p.trainable_tensors)} tensors"),
        ("merge", p.merge),
        ("bytes to read", size(p.bytes_read)),
        ("bytes to write (disk)", size(p.bytes_written)),
        ("estimated peak memory", size(p.peak_memory)),
    ]
    for k, v in rows:
        table.add_row(f"[bold]{k}", v)
    out.print(table)
    for note in p.notes:
        out.print(f"note: {note}")


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editor completion: yaml-language-server)."""
    from .pipeline.recipe import recipe_json_schema

    print(recipe_json_schema())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so every atomic folder and lock cleans up on the way out."""


_TERMINATED: list[bool] = []  # set by the SIGTERM handler: typer turns every KeyboardInterrupt into exit code 130


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the hardening tests in a subprocess
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup runs once, not cut short by a second TERM
    _TERMINATED.append(True)
    raise Terminated


def _interrupted(exc: Optional[BaseException] = None) -> None:
    """One line, and the shell's convention for the signal: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    chain = [exc, getattr(exc, "__context__", None), getattr(exc, "__cause__", None)]
    terminated = bool(_TERMINATED) or any(isinstance(e, Terminated) for e in chain)
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    console.print(f"[bold red]interrupted:[/] {what}; nothing was written to the output folder", highlight=False)
    sys.exit(143 if terminated else 130)


def _bad_option_value(exc: BaseException) -> None:
    """An option or argument value of the wrong type (typer's BadParameter): one line naming the option, status 2."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(exc.format_message())}; see --help", highlight=False, soft_wrap=True)
    sys.exit(2)


def main() -> None:
    """Entry point: one clear line and exit status 2 for bad input, never a traceback."""
    # Idle OpenMP workers sleep instead of spinning: our reader and writer threads need those cores, and spinning
    # workers on a busy machine slowed merges tenfold in the benchmarks. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer's answer to a KeyboardInterrupt (Ctrl-C, or SIGTERM through _on_sigterm)
            _interrupted()
        sys.exit(code if isinstance(code, int) else 0)
    except MergeEditError as exc:
        from rich.markup import escape  # messages may hold brackets (pip install 'mergeedit[lmeval]'), not markup

        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        # Usage mistakes (unknown command or option, missing argument): the usage line, the did-you-mean, exit 2.
        # typer >= 0.20 raises its own copies of click's classes (typer._click), older typers raise click's: both.
        usage: tuple[type, ...] = (typer.TyperException,)
        aborts: tuple[type, ...] = (typer.Abort,)
        try:
            import click

            usage, aborts = (*usage, click.exceptions.ClickException), (*aborts, click.exceptions.Abort)
        except ImportError:  # typer >= 0.20 does not need click
            pass
        if isinstance(exc, typer.BadParameter) and type(exc).__name__ != "MissingParameter":  # a missing argument is a usage mistake
            _bad_option_value(exc)
        if type(exc).__name__ == "Abort" and isinstance(exc.__context__, KeyboardInterrupt):
            _interrupted(exc)
        if isinstance(exc, usage) and callable(getattr(exc, "show", None)):
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        if isinstance(exc, aborts):
            sys.exit(130)
        from .core.environment import debug

        if debug():
            raise
        from rich.markup import escape  # an exception's text may hold brackets (gloo's "[.../pair.cc:553]"), not markup

        from .io.integrity import is_disk_full

        if is_disk_full(exc):  # a write path without its own wording: still one line, not an internal error
            where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
            console.print(f"[bold red]error:[/] the disk filled up{escape(where)}; folders being written were removed; free space and run again", highlight=False, soft_wrap=True)
            sys.exit(2)
        console.print(f"[bold red]internal error:[/] {exc.__class__.__name__}: {escape(str(exc))} (set MERGEEDIT_DEBUG=1 for the traceback and please report it)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
