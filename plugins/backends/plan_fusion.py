"""Fusing co-located shards: consecutive onnxruntime shards that run in this process, one
after the other, are served as one onnxruntime session.

A cut exists to move work elsewhere. Where neighbouring shards stay together, the cut
only costs: a session call per shard, a layout conversion at every border (onnxruntime's
blocked NCHWc layout is converted back and forth) and fusions that cannot span it. So
under the ``local`` driver the plan backend merges every maximal run of such shards
(consecutive in the plan's topological order, placement ``local``, backend
``onnxruntime``, the same ``[shards.options]``) into one model, in memory, from the shard
files as read through the runtime (signatures checked, decrypted). The merged model keeps
as outputs only the tensors that later shards or the plan's outputs read, so onnxruntime
is free to fuse across the old borders. ``[plan] fuse = false`` in model.toml (or the
server config) keeps every shard a session of its own, as a debugging aid or to get
per-shard metrics for in-process shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from plugins.shard_plan import Shard, ShardPlan

FUSED_SUFFIX = ".fused.onnx"


def fusible_runs(plan: ShardPlan, local: list[bool]) -> list[list[int]]:
    """Maximal runs (in topological order) of 2+ in-process onnxruntime shards that share
    their options; ``local[i]``: shard i runs in this process under the local executor."""
    runs: list[list[int]] = []
    current: list[int] = []
    for index in plan.order:
        shard = plan.shards[index]
        ok = local[index] and shard.backend == "onnxruntime"
        if ok and current and plan.shards[current[0]].options == shard.options:
            current.append(index)
            continue
        if len(current) > 1:
            runs.append(current)
        current = [index] if ok else []
    if len(current) > 1:
        runs.append(current)
    return runs


def fuse_plan(plan: ShardPlan, runs: list[list[int]],
              read_bytes: Callable[[str], bytes]) -> tuple[ShardPlan, dict[str, bytes], list]:
    """A plan where each run is one shard; the merged files' bytes by file name; and, per
    new shard, the original shard indices it stands for."""
    first = {run[0]: run for run in runs}
    merged = {i for run in runs for i in run}
    shards: list[Shard] = []
    members: list[list[int]] = []
    files: dict[str, bytes] = {}
    for index, shard in enumerate(plan.shards):
        if index in first:
            run = first[index]
            outside = {n for i, s in enumerate(plan.shards) if i not in run for n in s.inputs}
            keep = outside | set(plan.output_names)
            produced = [n for i in run for n in plan.shards[i].outputs]
            outputs = [n for n in produced if n in keep]
            name = "+".join(plan.shards[i].name for i in run)
            data, inputs = merge_models([(read_bytes(plan.shards[i].file),
                                          plan.shards[i].inputs, plan.shards[i].outputs)
                                         for i in run], outputs)
            files[name + FUSED_SUFFIX] = data
            shards.append(dataclasses.replace(shard, name=name, file=name + FUSED_SUFFIX,
                                              inputs=inputs, outputs=outputs))
            members.append(run)
        elif index not in merged:
            shards.append(shard)
            members.append([index])
    fused = dataclasses.replace(plan, shards=shards, order=[])
    position = {tuple(m): i for i, m in enumerate(members)}
    fused.order = [position[tuple(m)] for m in sorted(members, key=lambda m:
                                                     plan.order.index(m[0]))]
    return fused, files, members


def merge_models(shards: list[tuple[bytes, list[str], list[str]]],
                 outputs: list[str]) -> tuple[bytes, list[str]]:
    """One ONNX model running ``shards`` (bytes, plan inputs, plan outputs; in topological
    order) in sequence, with ``outputs`` as its outputs; returns its bytes and input names.

    Only the tensors plan.toml names at a shard's border keep their names; everything else
    in shard k (nodes, initializers, intermediate tensors, names inside subgraphs that refer
    to them) is renamed ``k/<name>``, so shards that reuse a name for different things
    (each optimised on its own, say) cannot collide. An initializer another shard already
    carries byte for byte (a weight copied into both) is kept once.
    """
    import onnx

    graph = onnx.GraphProto()
    typed: dict[str, Any] = {}  # border tensor -> ValueInfoProto
    carried: dict[str, list] = {}  # original initializer name -> the merge's tensors
    opsets: dict[str, int] = {}
    ir_version = 0
    for k, (blob, shard_inputs, shard_outputs) in enumerate(shards):
        model = onnx.ModelProto.FromString(blob)
        g = model.graph
        border = set(shard_inputs) | set(shard_outputs)
        rename: dict[str, str] = {}
        for tensor in g.initializer:
            original = tensor.name
            same = next((kept.name for kept in carried.get(original, ())
                         if _same_tensor(kept, tensor)), None)
            rename[original] = same or f"{k}/{original}"
            if same is None:
                tensor.name = rename[original]
                graph.initializer.append(tensor)
                carried.setdefault(original, []).append(tensor)
        if len(g.sparse_initializer):
            raise ValueError("sparse initializers are not fused")
        local = [i.name for i in g.input if i.name not in border and i.name not in rename]
        local += [o for node in g.node for o in node.output if o and o not in border]
        rename.update((name, f"{k}/{name}") for name in local)
        for info in g.input:
            if info.name in shard_inputs:
                if info.name not in typed:  # not made by an earlier shard, not yet an input
                    graph.input.append(info)
                typed.setdefault(info.name, info)
        for node in g.node:
            _rename(node, rename)
            node.name = f"{k}/{node.name}" if node.name else ""
            graph.node.append(node)
        for info in (*g.value_info, *g.output):
            if info.name in border:
                typed.setdefault(info.name, info)
            elif info.name in rename:
                info.name = rename[info.name]
                graph.value_info.append(info)
        for opset in model.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
        ir_version = max(ir_version, model.ir_version)
    graph.output.extend(typed[name] for name in outputs)
    graph.name = "fused"
    merged = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
        ir_version=ir_version, producer_name="shardserve-fuse")
    return merged.SerializeToString(), [info.name for info in graph.input]


def _same_tensor(kept: Any, tensor: Any) -> bool:
    """Whether two initializers hold the same data (type, shape, values or external
    location), whatever their names; compared only when their original names match."""
    name = tensor.name
    tensor.name = kept.name
    try:
        return kept == tensor
    finally:
        tensor.name = name


def _rename(node: Any, rename: dict[str, str]) -> None:
    """Rename a node's inputs and outputs, and outer-scope references in its subgraphs
    (ONNX names are never shadowed, so one map serves every scope)."""
    for i, name in enumerate(node.input):
        if name in rename:
            node.input[i] = rename[name]
    for i, name in enumerate(node.output):
        if name in rename:
            node.output[i] = rename[name]
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            for inner in sub.node:
                _rename(inner, rename)
            for out in sub.output:  # a subgraph may output an outer tensor directly
                if out.name in rename:
                    out.name = rename[out.name]
