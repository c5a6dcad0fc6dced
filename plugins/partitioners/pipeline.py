"""``pipeline``: K shards over the topological order, minimising the slowest stage.

A stage's time is its units' seconds times the device factor plus sending the
tensors live at its end over the link (bandwidth, RTT; by default an in-process
hand-off). Dynamic programming
over contiguous ranges finds the K-way split whose slowest stage is fastest
(ties: smallest total), which bounds a pipelined plan's throughput
(PipeEdge, EdgeShard). Exact for the given order: O(K n^2).
"""

from __future__ import annotations

from runtime.errors import BadRequest

from .partition import Partition, contiguous_groups, link_from, option, prefix_rows

# The default hop is in process: one more session call (~10 us) and the tensors
# at the border re-laid-out by onnxruntime on both sides (~5 GB/s on the CNN example).
IN_PROCESS_HOP_S = 10e-6
IN_PROCESS_BPS = 40e9


class PipelinePartitioner:
    description = "K shards minimising the slowest stage plus transfer (pipelined throughput)"

    def partition(self, graph, costs, options: dict) -> Partition:
        n = len(graph)
        k = option(options, "shards", 2)
        if k < 1 or k > n:
            nodes = sum(len(u.nodes) for u in graph.units)
            raise BadRequest(f"cannot cut {n} unit(s) into {k} shards: use 1 to {n} shards "
                             f"(the model has {nodes} computing node(s); a fused chain or a "
                             "control-flow node is one unit)")
        factor = option(options, "device_factor", 1.0)
        link = link_from(options, IN_PROCESS_BPS, IN_PROCESS_HOP_S)
        live = graph.live_bytes()
        prefix = [0.0]
        for s in costs.seconds:
            prefix.append(prefix[-1] + s * factor)

        def send(j: int) -> float:
            return 0.0 if j >= n else link.transfer_s(live[j]) + link.rtt_s

        def stage(i: int, j: int) -> float:
            return prefix[j] - prefix[i] + send(j)

        inf = (float("inf"), float("inf"))
        best = [[inf] * (n + 1) for _ in range(k + 1)]
        back = [[0] * (n + 1) for _ in range(k + 1)]
        best[0][0] = (0.0, 0.0)
        for stages in range(1, k + 1):
            for j in range(stages, n - (k - stages) + 1):
                for i in range(stages - 1, j):
                    prev = best[stages - 1][i]
                    if prev[0] == float("inf"):
                        continue
                    cost = stage(i, j)
                    cand = (max(prev[0], cost), prev[1] + cost)
                    if cand < best[stages][j]:
                        best[stages][j], back[stages][j] = cand, i
        cuts, j = [], n
        for stages in range(k, 0, -1):
            j = back[stages][j]
            cuts.append(j)
        cuts = sorted(c for c in cuts if 0 < c < n)
        groups = contiguous_groups(cuts, n)
        bounds = [0, *cuts, n]
        shard_costs = [{"predicted_s": stage(a, b), "compute_s": prefix[b] - prefix[a],
                        "send_bytes": live[b] if b < n else 0}
                       for a, b in zip(bounds[:-1], bounds[1:])]
        bottleneck, total = best[k][n]
        rows = prefix_rows(graph, costs, lambda pos: prefix[n] + (send(pos) if 0 < pos < n else 0))
        for row in rows:
            pos = row["cut"]
            row["bottleneck_s"] = max(stage(0, pos), stage(pos, n)) if 0 < pos < n else prefix[n]
        return Partition(groups, predicted={"bottleneck_s": bottleneck, "latency_s": total,
                                            "throughput_per_s": 1.0 / bottleneck if bottleneck
                                            else 0.0}, shard_costs=shard_costs, candidates=rows)
