"""``edge-cloud``: the best cut of a DAG between an edge device and the cloud.

Cost model (latency): inputs start on the edge and outputs are returned to it.
Edge units cost ``seconds * edge_factor``, cloud units ``seconds * cloud_factor``;
if anything runs in the cloud, one round trip costs ``rtt`` plus every tensor
that crosses (edge -> cloud, and outputs cloud -> edge) over ``bandwidth``.
A cut is any set of tensors: the edge part must be closed under predecessors
(no tensor comes back from the cloud for more edge work).

This is solved exactly as an s-t min-cut (DADS): each unit is a vertex with an
edge-cost and a cloud-cost arc, each crossing tensor an auxiliary vertex so it
is paid once however many cloud units read it, and infinite arcs keep the edge
part predecessor-closed. The RTT is paid only when the cloud part is not empty,
so the answer is the better of the min-cut (plus RTT) and edge-only.

Objective ``gb-seconds``: minimise cloud GB-seconds (``memory_gb`` times cloud
compute seconds) under a latency SLO: exhaustive over all valid cuts when
there are at most ``exhaustive_limit`` of them, otherwise a Lagrangian sweep of
min-cuts over ``lambda * latency + GB-seconds`` (a heuristic, documented).
"""

from __future__ import annotations

from collections import deque

from runtime.errors import BadRequest

from .partition import Partition, link_from, option, prefix_rows

INF = 1e30


class MaxFlow:
    """Dinic's max-flow on float capacities; small graphs (hundreds of vertices)."""

    def __init__(self, n: int):
        self.adj: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[float] = []

    def add(self, u: int, v: int, cap: float) -> None:
        if cap <= 0:
            return
        self.adj[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(cap)
        self.adj[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)

    def _levels(self, s: int, t: int) -> list[int] | None:
        level = [-1] * len(self.adj)
        level[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for e in self.adj[u]:
                if self.cap[e] > 1e-18 and level[self.to[e]] < 0:
                    level[self.to[e]] = level[u] + 1
                    queue.append(self.to[e])
        return level if level[t] >= 0 else None

    def _blocking_flow(self, s: int, t: int, level: list[int]) -> None:
        """Augment along shortest paths until none is left (iterative DFS)."""
        it = [0] * len(self.adj)
        while True:
            path: list[int] = []
            u = s
            while u != t:
                while it[u] < len(self.adj[u]):
                    e = self.adj[u][it[u]]
                    if self.cap[e] > 1e-18 and level[self.to[e]] == level[u] + 1:
                        break
                    it[u] += 1
                if it[u] < len(self.adj[u]):
                    e = self.adj[u][it[u]]
                    path.append(e)
                    u = self.to[e]
                    continue
                if u == s:
                    return
                level[u] = -1  # a dead end: never try it again in this phase
                e = path.pop()
                u = self.to[e ^ 1]
                it[u] += 1
            pushed = min(self.cap[e] for e in path)
            for e in path:
                self.cap[e] -= pushed
                self.cap[e ^ 1] += pushed

    def source_side(self, s: int, t: int) -> set[int]:
        """Run the flow, then the vertices still reachable from ``s``."""
        while (level := self._levels(s, t)) is not None:
            self._blocking_flow(s, t, level)
        return {v for v, lv in enumerate(self._levels_all(s)) if lv >= 0}

    def _levels_all(self, s: int) -> list[int]:
        seen = [-1] * len(self.adj)
        seen[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for e in self.adj[u]:
                if self.cap[e] > 1e-18 and seen[self.to[e]] < 0:
                    seen[self.to[e]] = 0
                    queue.append(self.to[e])
        return seen


class EdgeCloudModel:
    """Latency and GB-seconds of any edge set under one device/link setting."""

    def __init__(self, graph, costs, options: dict):
        self.graph, self.seconds = graph, costs.seconds
        self.edge_factor = option(options, "edge_factor", 4.0)
        self.cloud_factor = option(options, "cloud_factor", 1.0)
        self.link = link_from(options, 10e6, 0.02)
        self.memory_gb = option(options, "memory_gb", 1.0)

    def latency(self, edge: set[int]) -> float:
        g = self.graph
        total = sum(s * (self.edge_factor if u in edge else self.cloud_factor)
                    for u, s in enumerate(self.seconds))
        if len(edge) == len(g):
            return total
        sent = g.sent_from(edge | {-1})
        back = [o for o in g.outputs if g.producer.get(o, -1) >= 0 and g.producer[o] not in edge]
        nbytes = sum(g.tensor_bytes.get(t, 0) for t in sent + back)
        return total + self.link.rtt_s + self.link.transfer_s(nbytes)

    def gb_seconds(self, edge: set[int]) -> float:
        cloud = sum(s for u, s in enumerate(self.seconds) if u not in edge)
        return self.memory_gb * cloud * self.cloud_factor

    def min_cut(self, weight_latency: float = 1.0, weight_gbs: float = 0.0) -> set[int]:
        """The edge set minimising ``weight_latency * (latency - rtt) + weight_gbs * GB-s``."""
        g, n = self.graph, len(self.graph)
        tensors = list(g.consumers)
        flow = MaxFlow(2 + n + len(tensors))
        s, t = 0, 1
        down = {u: 0 for u in range(n)}
        for o in g.outputs:
            if g.producer.get(o, -1) >= 0:
                down[g.producer[o]] += g.tensor_bytes.get(o, 0)
        for u, sec in enumerate(self.seconds):
            cloud = weight_latency * (sec * self.cloud_factor + self.link.transfer_s(down[u]))
            cloud += weight_gbs * self.memory_gb * sec * self.cloud_factor
            flow.add(s, 2 + u, cloud)
            flow.add(2 + u, t, weight_latency * sec * self.edge_factor)
        for k, name in enumerate(tensors):
            aux = 2 + n + k
            source = g.producer.get(name, -1)
            flow.add(s if source < 0 else 2 + source, aux,
                     weight_latency * self.link.transfer_s(g.tensor_bytes.get(name, 0)) + 1e-15)
            for user in g.consumers[name]:
                flow.add(aux, 2 + user, INF)
                if source >= 0:
                    flow.add(2 + user, 2 + source, INF)  # edge part stays predecessor-closed
        side = flow.source_side(s, t)
        return {u for u in range(n) if 2 + u in side}


def valid_edge_sets(graph, limit: int):
    """Every predecessor-closed unit set, or None when there are more than ``limit``."""
    if len(graph) > 500:  # the walk below recurses once per unit
        return None
    preds = [{graph.producer[x] for x in u.inputs if x in graph.producer} for u in graph.units]
    out: list[set[int]] = []

    def walk(i: int, chosen: set[int]) -> bool:
        if len(out) > limit:
            return False
        if i == len(graph):
            out.append(set(chosen))
            return True
        ok = walk(i + 1, chosen)
        if ok and preds[i] <= chosen:
            chosen.add(i)
            ok = walk(i + 1, chosen)
            chosen.discard(i)
        return ok

    return out if walk(0, set()) and len(out) <= limit else None


class EdgeCloudPartitioner:
    description = "edge/cloud cut minimising latency (exact min-cut) or GB-seconds under an SLO"

    def choose(self, graph, costs, options: dict) -> tuple[EdgeCloudModel, set[int]]:
        """The cost model and the units the objective puts on the edge."""
        model = EdgeCloudModel(graph, costs, options)
        objective = options.get("objective") or "latency"
        if objective == "latency":
            everything = set(range(len(graph)))
            edge = min((model.min_cut(), everything), key=lambda e: (model.latency(e), -len(e)))
        elif objective == "gb-seconds":
            edge = self._cheapest_under_slo(model, graph, options)
        else:
            raise BadRequest("objective must be 'latency' or 'gb-seconds'")
        return model, edge

    def partition(self, graph, costs, options: dict) -> Partition:
        model, edge = self.choose(graph, costs, options)
        everything = set(range(len(graph)))
        cloud_only, edge_only = model.latency(set()), model.latency(everything)
        groups = [sorted(edge), sorted(everything - edge)]
        placements = [options.get("edge_placement") or "local",
                      options.get("cloud_placement") or "local"]
        shard_costs = [
            {"predicted_s": sum(costs.seconds[u] for u in edge) * model.edge_factor,
             "device": "edge", "send_bytes": sum(graph.tensor_bytes.get(x, 0)
                                                 for x in graph.sent_from(edge))},
            {"predicted_s": sum(costs.seconds[u] for u in everything - edge) * model.cloud_factor,
             "device": "cloud", "send_bytes": 0},
        ]
        keep = [i for i, grp in enumerate(groups) if grp]
        order = list(range(len(graph)))
        rows = prefix_rows(graph, costs, lambda pos: model.latency(set(order[:pos])))
        return Partition(
            [groups[i] for i in keep], [placements[i] for i in keep],
            predicted={"latency_s": model.latency(edge), "gb_seconds": model.gb_seconds(edge),
                       "edge_only_s": edge_only, "cloud_only_s": cloud_only,
                       "speedup_over_cloud_only": cloud_only / max(model.latency(edge), 1e-12),
                       "cut_bytes": sum(graph.tensor_bytes.get(x, 0)
                                        for x in graph.sent_from(edge | {-1})) if edge != everything
                       else 0},
            shard_costs=[shard_costs[i] for i in keep], candidates=rows)

    @staticmethod
    def _cheapest_under_slo(model: EdgeCloudModel, graph, options: dict) -> set[int]:
        slo = option(options, "slo", float("inf"), "s")
        limit = int(option(options, "exhaustive_limit", 20000))
        candidates = valid_edge_sets(graph, limit)
        if candidates is None:  # Lagrangian sweep over min-cuts
            candidates = [set(range(len(graph)))]
            for lam in [10.0 ** (e / 2) for e in range(-12, 13)]:
                candidates.append(model.min_cut(weight_latency=lam, weight_gbs=1.0))
        feasible = [e for e in candidates if model.latency(e) <= slo]
        if not feasible:
            best = min(model.latency(e) for e in candidates)
            raise BadRequest(f"no cut meets the latency SLO of {slo * 1e3:.3f} ms "
                             f"(the fastest is {best * 1e3:.3f} ms)")
        return min(feasible, key=lambda e: (model.gb_seconds(e), model.latency(e)))
