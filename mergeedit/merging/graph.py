"""Merge graphs: one YAML file of several merges that read one another's outputs by name.

The format is mergekit-multi's: a multi-document YAML (documents separated by `---`), each document a merge config,
plus `name:` on the merges that others use; a model reference equal to a name means that merge's output. The one
unnamed document is the final output (mergekit-multi writes it to --out-path and every named merge to its
--intermediate-dir); when every document is named, the last one is the final output here.

Intermediates never touch the disk: every merge is planned as usual, and a named merge becomes a *computed* model
source for the merges that read it. Reading one of its tensors (whole, or a range of rows) runs that tensor's plan,
statistics passes included, so the executor streams the whole graph tensor by tensor under one memory budget, which
counts the upstream inputs a computed read holds. `--keep-intermediates DIR` instead writes each named merge to
DIR/<name> first, as mergekit-multi does, and the later merges read those folders.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core.errors import MergeEditError
from ..core.yaml_source import YamlDocument, count_yaml_documents, did_you_mean, load_yaml_documents
from ..io.dtypes import TORCH_TO_SAFETENSORS, itemsize
from ..io.model_source import ModelSource, open_model
from ..io.tensor_reader import ComputedTensorInfo, TensorReader
from .chunks import DEFAULT_BLOCK, build_statistics, input_blocks, load_inputs, merge_chunk
from .config import config_from_document, locate_model
from .plan import MergePlan, PlannedTensor, build_plan
from .schema import MergeConfig

Rows = Optional[tuple[int, int]]  # rows [a, b) of a tensor's first dimension; None = all of it
_CACHED_STATISTICS = 4  # whole-tensor statistics kept per merge: a tensor's row chunks are read one after another


def is_merge_graph(config_path: Path | str) -> bool:
    """Several YAML documents in one config file: a merge graph (a single document is a plain merge)."""
    return count_yaml_documents(config_path) > 1


# -- the graph ----------------------------------------------------------------------------------------------------
@dataclass
class GraphNode:
    name: Optional[str]  # None: the unnamed (final) document
    config: MergeConfig
    doc: YamlDocument
    inputs: dict[str, tuple] = field(default_factory=dict)  # merges of this graph it reads -> where it names the first

    @property
    def label(self) -> str:
        return f"merge '{self.name}'" if self.name else "the final merge"


@dataclass
class MergeGraph:
    path: Path
    nodes: dict[Optional[str], GraphNode]  # in file order
    final: GraphNode

    def dependencies_first(self, targets: list[GraphNode]) -> list[GraphNode]:
        """`targets` and every merge they read, each after its inputs."""
        order: dict[Optional[str], GraphNode] = {}

        def visit(node: GraphNode) -> None:
            for dep in node.inputs:
                if dep not in order:
                    visit(self.nodes[dep])
            order.setdefault(node.name, node)

        for node in targets:
            visit(node)
        return list(order.values())

    def unused(self) -> list[GraphNode]:
        needed = {n.name for n in self.dependencies_first([self.final])}
        return [n for n in self.nodes.values() if n.name not in needed]


def _parse_node(doc: YamlDocument) -> GraphNode:
    name = doc.data.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise MergeEditError(f"{doc.where(('name',))}: a merge name must be a non-empty string, got {name!r}")
    try:
        config, located = config_from_document(doc)
    except MergeEditError as exc:
        raise MergeEditError(f"{exc} (in merge '{name}')" if name else str(exc)) from None
    return GraphNode(name, config, located)


def load_merge_graph(config_path: Path | str) -> MergeGraph:
    """Parse every document, link names to the merges that read them, and refuse cycles, unknown names and ambiguity."""
    path = Path(config_path)
    nodes: dict[Optional[str], GraphNode] = {}
    for doc in load_yaml_documents(path, "merge config"):
        node = _parse_node(doc)
        if node.name in nodes:
            if node.name is None:
                raise MergeEditError(f"{doc.where(())}: a second document without 'name'; only one merge, the final one, may be unnamed")
            raise MergeEditError(
                f"{doc.where(('name',))}: merge name '{node.name}' is used twice (first at {nodes[node.name].doc.where(('name',))}); "
                "give each merge its own name"
            )
        nodes[node.name] = node
    graph = MergeGraph(path, nodes, nodes.get(None) or list(nodes.values())[-1])
    _link(graph)
    _refuse_cycles(graph)
    return graph


def _link(graph: MergeGraph) -> None:
    names = sorted(n for n in graph.nodes if n is not None)
    for node in graph.nodes.values():
        for ref, key in node.config.model_references():
            found = locate_model(ref, graph.path)
            if ref in graph.nodes:
                if found is not None:
                    raise MergeEditError(
                        f"{node.doc.where(key)}: '{ref}' is both a merge of this file and the folder {found}; "
                        f"rename the merge or refer to the folder by another path (in {node.label})"
                    )
                node.inputs.setdefault(ref, key)
            elif found is None and "/" not in ref and "+" not in ref:  # a bare word: no folder, and hub ids have an org/
                raise MergeEditError(
                    f"{node.doc.where(key)}: '{ref}' is neither a merge of this file ({', '.join(names)}) nor a model folder"
                    f"{did_you_mean(ref, names)}; fix the name (in {node.label})"
                )


def _refuse_cycles(graph: MergeGraph) -> None:
    done: set[Optional[str]] = set()

    def visit(node: GraphNode, trail: list[str]) -> None:
        for dep, key in node.inputs.items():
            if dep in trail:
                cycle = " -> ".join(trail[trail.index(dep):] + [dep])
                raise MergeEditError(
                    f"{node.doc.where(key)}: the merges read each other in a cycle ({cycle}, where a -> b means a reads b); "
                    f"a merge cannot use its own output (in {node.label})"
                )
            if dep not in done:
                visit(graph.nodes[dep], trail + [dep])
        done.add(node.name)

    for node in graph.nodes.values():
        if node.name not in done:
            visit(node, [node.name or "final"])


# -- computed intermediates ---------------------------------------------------------------------------------------
class NodeOutput:
    """Computes a merge's output tensors on demand from its plan: the bytes its output folder would hold."""

    def __init__(self, name: str, plan: MergePlan, block: int = DEFAULT_BLOCK) -> None:
        self.name = name
        self.plan = plan
        self.block = block
        self._statistics: OrderedDict[str, Any] = OrderedDict()

    def read(self, t: PlannedTensor, reader: TensorReader, rows: Rows, alloc: Optional[Callable] = None) -> torch.Tensor:
        stats = self._whole_tensor_statistics(t, reader, rows)
        stored = load_inputs(reader, t, rows, alloc)
        shape = (rows[1] - rows[0], *t.shape[1:]) if rows is not None else tuple(t.shape)
        nbytes = math.prod(shape) * itemsize(t.out_dtype)
        raw = alloc(nbytes) if alloc is not None and nbytes else torch.empty(nbytes, dtype=torch.uint8)
        out = raw.view(t.out_dtype).view(shape)
        if merge_chunk(t, rows, stored, stats, out, self.block) is not None:
            raise MergeEditError(
                f"{self.plan.doc.path}: merge '{self.name}' gives NaN/Inf in '{t.name}' (an input holds them, or "
                f"{str(t.out_dtype).removeprefix('torch.')} overflowed); repair that input or give this merge a wider out_dtype"
            )
        return out

    def _whole_tensor_statistics(self, t: PlannedTensor, reader: TensorReader, rows: Rows) -> Any:
        """The method's statistics over all of `t`, gathered in chunks the size of the one asked for, then kept a while."""
        if t.name in self._statistics:
            self._statistics.move_to_end(t.name)
            return self._statistics[t.name]
        stats = build_statistics(t)
        if stats is None:
            return None
        step = rows[1] - rows[0] if rows is not None else t.rows
        chunks = [None] if rows is None else [(a, min(a + step, t.rows)) for a in range(0, t.rows, step)]
        p = 0
        while p < stats.passes:  # a statistic may add passes as it learns (a tie group at a top-k threshold)
            for chunk in chunks:
                for _, block in input_blocks(t, chunk, load_inputs(reader, t, chunk), self.block):
                    stats.observe(p, block)
            stats.end_pass(p)
            p += 1
        result = self._statistics[t.name] = stats.result()
        while len(self._statistics) > _CACHED_STATISTICS:
            self._statistics.popitem(last=False)
        return result


@dataclass
class ComputedModel(ModelSource):
    """A named merge's output as an input of later merges: every tensor computed from `plan` when read."""

    plan: Optional[MergePlan] = None


def computed_model(name: str, plan: MergePlan) -> ComputedModel:
    output = NodeOutput(name, plan)
    tensors = {
        t.name: ComputedTensorInfo(
            name=t.name,
            dtype=TORCH_TO_SAFETENSORS[t.out_dtype],
            shape=tuple(t.shape),
            path=plan.doc.path,  # the file that defines it (what a resumed run must see unchanged)
            start=0,
            end=t.bytes_out,
            compute=partial(output.read, t),
            inputs_bytes_per_element=t.bytes_per_element_in_flight() - itemsize(t.out_dtype),
        )
        for t in plan.tensors
    }
    # Its config and (for the files copied beside the weights) its folder are those its output would take.
    folder = (plan.base_model or plan.models[0]).folder
    return ComputedModel(ref=name, path=folder, tensors=tensors, config=plan.out_config, plan=plan)


def upstream_merges(plan: MergePlan) -> list[tuple[str, MergePlan]]:
    """The graph merges `plan` reads (directly or not), each after its own inputs; empty for a plain merge."""
    found: dict[str, MergePlan] = {}

    def visit(p: MergePlan) -> None:
        for model in p.models:
            if isinstance(model, ComputedModel) and model.ref not in found:
                visit(model.plan)
                found[model.ref] = model.plan

    visit(plan)
    return list(found.items())


def every_merge(plan: MergePlan) -> list[MergePlan]:
    """`plan` and every graph merge it reads: what decides the output's bytes."""
    return [plan] + [p for _, p in upstream_merges(plan)]


def input_folders(plan: MergePlan) -> list[Path]:
    """The folders on disk that `plan` and its upstream merges read (a computed intermediate has none)."""
    return [m.folder for p in every_merge(plan) for m in p.models if not isinstance(m, ComputedModel)]


# -- planning -----------------------------------------------------------------------------------------------------
class GraphPlanner:
    """Plans merges of a graph; the merges they read come from `on_disk` folders, else are computed models."""

    def __init__(self, graph: MergeGraph, options: Any, on_disk: Optional[dict[str, Path]] = None) -> None:
        self.graph = graph
        self.options = options  # a merge.MergeOptions: random_seed, out_dtype (final merge only), allow_pickle
        self.on_disk = on_disk or {}
        self.sources: dict[str, ModelSource] = {}
        self.warnings: list[str] = []

    def plan(self, node: GraphNode) -> MergePlan:
        for dep in node.inputs:
            if dep not in self.sources:
                self.sources[dep] = self._source(self.graph.nodes[dep])
        final = node is self.graph.final
        try:
            plan = build_plan(
                node.config, node.doc, random_seed=self.options.random_seed, out_dtype=self.options.out_dtype if final else None,
                opener=partial(self._open, node), float32_compute=self.options.float32_compute,
            )
        except MergeEditError as exc:
            raise MergeEditError(f"{exc} (in {node.label})") from None
        if not final:
            self.warnings += [f"{w} (in {node.label})" for w in plan.warnings]
        return plan

    def _source(self, node: GraphNode) -> ModelSource:
        if node.name in self.on_disk:
            return open_model(str(self.on_disk[node.name]))
        plan = self.plan(node)
        if plan.output_tokenizer is not None:
            raise MergeEditError(
                f"{node.doc.where(('tokenizer',))}: {node.label} builds a merged tokenizer, which the merges reading it need on disk; "
                "pass --keep-intermediates DIR"
            )
        return computed_model(node.name, plan)

    def _open(self, node: GraphNode, ref: str) -> ModelSource:
        if ref in node.inputs:
            return self.sources[ref]
        found = locate_model(ref, self.graph.path)
        target = str(found) if found is not None else ref
        return open_model(target, allow_pickle=self.options.allow_pickle)

    def plan_final(self, skipping_unused: bool = True) -> MergePlan:
        plan = self.plan(self.graph.final)
        plan.warnings += self.warnings
        if skipping_unused:
            plan.warnings += [
                f"{n.doc.where(('name',))}: {n.label} is not an input of the final merge, so it is not computed "
                "(--keep-intermediates DIR writes every named merge)"
                for n in self.graph.unused()
            ]
        return plan


def plan_merge_graph(config_path: Path | str, options: Any) -> MergePlan:
    """The final merge's plan; the merges it reads are computed models inside it (see upstream_merges)."""
    return GraphPlanner(load_merge_graph(config_path), options).plan_final()


def write_intermediates(config_path: Path | str, options: Any, keep_dir: Path, write: Callable[[MergePlan, Path], Any]) -> MergePlan:
    """mergekit-multi's way: write every named merge to keep_dir/<name>, dependencies first, each read back by the
    merges after it; returns the final merge's plan over those folders."""
    graph = load_merge_graph(config_path)
    on_disk: dict[str, Path] = {}
    named = [n for n in graph.dependencies_first(list(graph.nodes.values())) if n is not graph.final]
    for node in named:
        out = Path(keep_dir) / node.name
        write(GraphPlanner(graph, options, on_disk).plan(node), out)
        on_disk[node.name] = out
    return GraphPlanner(graph, options, on_disk).plan_final(skipping_unused=False)
