"""The built-in strategies, and ``batch`` (data-parallel replicas)."""

from __future__ import annotations

from runtime.errors import BadRequest

from .edge_cloud import EdgeCloudPartitioner
from .memory import MemoryPartitioner
from .partition import Partition, option
from .pipeline import PipelinePartitioner


class BatchPartitioner:
    """``replicas`` copies of the whole model, each serving a slice of the batch.

    The plan backend splits every input along dim 0 into near-equal slices,
    runs replica i on slice i and concatenates the outputs; every input and
    output must therefore have a dynamic first (batch) dimension, and the
    model must treat samples independently (checked by the verification run).
    """

    description = "data-parallel replicas, each taking a slice of the batch dimension"

    def partition(self, graph, costs, options: dict) -> Partition:
        replicas = option(options, "replicas", 2)
        if replicas < 1:
            raise BadRequest("replicas must be at least 1")
        if not graph.batch_dynamic:
            raise BadRequest("the batch strategy needs a dynamic first (batch) dimension on "
                             "every input and output")
        total = costs.total()
        per_replica = total / replicas  # costs scale with the batch slice
        return Partition(
            [list(range(len(graph)))] * replicas,
            [options.get("placement") or "local"] * replicas,
            predicted={"latency_s": per_replica, "sequential_latency_s": total,
                       "replicas": replicas},
            shard_costs=[{"predicted_s": per_replica} for _ in range(replicas)],
            candidates=[{"cut": r, "after": f"{r} replica(s)", "bytes": 0,
                         "latency_s": total / r} for r in range(1, replicas + 1)],
            replicas=replicas,
        )


BUILTIN_PARTITIONERS = {
    "pipeline": PipelinePartitioner(),
    "edge-cloud": EdgeCloudPartitioner(),
    "memory": MemoryPartitioner(),
    "batch": BatchPartitioner(),
}
