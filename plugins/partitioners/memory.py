"""``memory``: shards that each fit a memory budget (Gillis-style serverless limits).

A shard needs its weights (every static tensor it carries, counted once) plus
its peak activation memory: walking its units in order, the bytes of tensors
alive at once (its inputs until their last use in the shard, each unit's
outputs until their last use, or to the end when later shards or the caller
need them). ``max_shard_bytes`` optionally bounds the weights alone (a
package-size limit). Dynamic programming over contiguous ranges of the
topological order picks the fewest shards, then the fewest bytes crossing cuts.
"""

from __future__ import annotations

from runtime.errors import BadRequest

from .partition import Partition, contiguous_groups, option


def shard_memory(graph, start: int, end: int) -> tuple[int, int]:
    """(weight bytes, peak activation bytes) of the shard holding units [start, end)."""
    weights = graph.weights_of(range(start, end))
    last_use: dict[str, int] = {}
    entering: set[str] = set()
    for k in range(start, end):
        for name in graph.units[k].inputs:
            last_use[name] = k
            if graph.producer.get(name, -1) < start:
                entering.add(name)
    outputs = set(graph.outputs)
    delta = [0] * (end - start + 2)
    for name in entering:
        delta[0] += graph.tensor_bytes.get(name, 0)
        delta[last_use[name] - start + 1] -= graph.tensor_bytes.get(name, 0)
    for k in range(start, end):
        for name in graph.units[k].outputs:
            users = graph.consumers.get(name, [])
            leaves = name in outputs or any(u >= end for u in users)
            stop = end if leaves else last_use.get(name, k)
            delta[k - start] += graph.tensor_bytes.get(name, 0)
            delta[stop - start + 1] -= graph.tensor_bytes.get(name, 0)
    peak = running = 0
    for value in delta:
        running += value
        peak = max(peak, running)
    return weights, peak


class MemoryPartitioner:
    description = "fewest shards whose weights plus peak activations fit a memory budget"

    def partition(self, graph, costs, options: dict) -> Partition:
        budget = option(options, "memory_budget", 0.0, "bytes")
        package = option(options, "max_shard_bytes", 0.0, "bytes") or float("inf")
        if budget <= 0:
            raise BadRequest("the memory strategy needs --memory-budget (e.g. 512MB)")
        n = len(graph)
        live = graph.live_bytes()
        inf = (float("inf"), float("inf"))
        best = [inf] * (n + 1)
        back = [0] * (n + 1)
        best[0] = (0, 0)
        need = {}
        for i in range(n):
            if best[i] == inf or best[i][0] >= best[n][0]:
                continue  # unreachable, or cannot beat the shard count already found
            for j in range(i + 1, n + 1):
                weights, peak = shard_memory(graph, i, j)
                need[(i, j)] = (weights, peak)
                if weights > budget or weights > package:
                    break
                if weights + peak > budget:
                    continue
                cand = (best[i][0] + 1, best[i][1] + (live[i] if i else 0))
                if cand < best[j]:
                    best[j], back[j] = cand, i
        if best[n] == inf:
            worst = max(range(n), key=lambda u: sum(shard_memory(graph, u, u + 1)))
            w, p = shard_memory(graph, worst, worst + 1)
            unit = graph.units[worst]
            raise BadRequest(f"no partition fits the budget: unit {unit.name!r} "
                             f"({unit.op_type}) alone needs {w + p} bytes ({w} of weights), "
                             f"over {int(budget)}"
                             + ("" if package == float("inf") else
                                f" or a package limit of {int(package)}"))
        cuts, j = [], n
        while j > 0:
            j = back[j]
            if j:
                cuts.append(j)
        cuts.sort()
        groups = contiguous_groups(cuts, n)
        bounds = [0, *cuts, n]
        shard_costs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            weights, peak = need.get((a, b)) or shard_memory(graph, a, b)
            shard_costs.append({"predicted_s": costs.total(range(a, b)), "weight_bytes": weights,
                                "peak_activation_bytes": peak, "memory_bytes": weights + peak,
                                "send_bytes": live[b] if b < n else 0})
        rows = []
        for pos in range(1, n):
            unit = graph.units[pos - 1]
            rows.append({"cut": pos, "after": f"{unit.name} ({unit.op_type})", "bytes": live[pos],
                         "latency_s": costs.total(),
                         "memory_bytes": max(sum(shard_memory(graph, 0, pos)),
                                             sum(shard_memory(graph, pos, n)))})
        return Partition(groups, predicted={"latency_s": costs.total(), "shards": len(groups),
                                            "cut_bytes": best[n][1],
                                            "max_memory_bytes": max(c["memory_bytes"]
                                                                    for c in shard_costs)},
                         shard_costs=shard_costs, candidates=rows)
