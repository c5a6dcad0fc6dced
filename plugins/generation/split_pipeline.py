"""Pipelining a split decoder across streams (EdgeShard/PipeEdge style), with continuous
batching inside each stage.

The running sequences form *groups* (by default as many as stages). Each group is a
:class:`~.split_engine.SplitEngine` with its own scheduler thread and its own instance of
every stage - its own :class:`~.split_engine.LayerStage` over the shared session in process,
its own client id on a remote stage node, its own Dask actor - so each group has its own batch
and KV caches everywhere. An in-process stage works on one group at a time (a lock per
stage), and a group moves on to the next stage as soon as it is done with one: while stage 2
decodes group A, stage 1 runs group B. onnxruntime and HTTP calls release the GIL, so stages
in different processes, or an in-process stage and a remote one, really run at once. A remote
stage (another shardserve, a Dask actor) takes no lock here: its node orders the calls, and
while one group waits for the link another can be on its way.

A new sequence joins the group with the fewest sequences (running, prefilling or waiting) and
is admitted by that group between two of its steps, in arrival order over all groups (as one
queue: a small request in one group never overtakes an older large one waiting for room in
another); finished, cancelled and timed-out ones leave their group as before. Rows
(``max_batch``), the KV-cache budget and the queue (``max_queue``) are counted over all groups,
so pipelining serves the same load as one batch. Prefill, rebuilding a stage's caches from
tokens, fail-over and deadlines are each group's own, unchanged.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

from runtime.errors import TooManyRequests

from .engine import EngineLimits, GraphInfo, Sequence
from .split_engine import Hop, SplitEngine


def _load(group: SplitEngine) -> int:
    return len(group._batch) + len(group._prefilling) + len(group._pending)


class PipelinedEngine:
    """The engine API (``submit``, ``events``, ``withdraw``, ``close``) over groups of stages
    that take turns on each stage."""

    def __init__(self, groups: list[list], graph: GraphInfo, limits: EngineLimits, name: str,
                 hop_records: int = 4096):
        self.graph, self.limits, self.name = graph, limits, name
        # In-process stages (and Lambda functions: a second invocation at once would land on
        # another instance, without the caches) serve one group at a time. A stage node or a
        # Dask actor orders its own calls: a lock held across the network would serialise the
        # link's round trips, the very latency the other groups' work should overlap.
        self.locks = [None if getattr(stage, "orders_own_calls", False) else threading.Lock()
                      for stage in groups[0]]
        self.hops: deque[Hop] = deque(maxlen=hop_records)
        self._lock = threading.Lock()  # submit: the queue bound and the group chosen
        # admission (fits): taken inside a group's _cond, never held while taking one
        self._admit = threading.Lock()
        self._approved: dict[int, Sequence] = {}  # group id -> admitted, maybe not listed yet
        self._tickets = itertools.count()
        self.groups = [SplitEngine(stages, graph, limits, name, pipeline=self)
                       for stages in groups]
        self.stages = self.groups[0].stages
        self.max_rows_seen = 0  # the most sequences decoding at once, over all groups

    # the engine API ------------------------------------------------------------------------

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        self.groups[0].check(prompt_tokens, max_tokens)

    def submit(self, seq: Sequence) -> None:
        self.check(len(seq.prompt), seq.max_tokens)
        with self._lock:
            if sum(len(g._pending) for g in self.groups) >= self.limits.max_queue:
                raise TooManyRequests(f"model {self.name!r} is at capacity, retry later",
                                      headers={"Retry-After": "1"})
            group = min(self.groups, key=_load)
            seq.group, seq.ticket = group, next(self._tickets)
            group.submit(seq)

    def events(self, seq: Sequence):
        return seq.group.events(seq)

    def withdraw(self, seq: Sequence) -> bool:
        return seq.group.withdraw(seq)

    def close(self) -> None:
        for group in self.groups:
            group.close()

    # what the groups ask -------------------------------------------------------------------

    def fits(self, group: SplitEngine, seq: Sequence) -> bool:
        """Whether ``group`` may admit ``seq``: rows and KV-cache bytes over all groups, each
        group reserving its rows x its longest final length, as one batch does. The oldest
        waiting sequence of all groups goes first, and one check and its admission are atomic
        over the groups (two groups admitting at once cannot both take the last room)."""
        with self._admit:
            self._approved.pop(id(group), None)  # this group listed it before asking again
            for g in self.groups:
                try:
                    head = g._pending[0] if g is not group else None
                except IndexError:  # emptied meanwhile
                    head = None
                if (head is not None and getattr(head, "ticket", 0) < getattr(seq, "ticket", 0)
                        and (self.graph.has_position_ids or not (g._batch or g._prefilling))):
                    return False  # older, and waiting for shared room (not its group's turn)
            rows = need = 0
            for g in self.groups:
                members = [*g._batch, *g._prefilling, *([seq] if g is group else [])]
                approved = self._approved.get(id(g))
                if (approved is not None and approved.finish_reason is None
                        and not any(m is approved for m in members)):
                    members.append(approved)  # admitted by g, not in its lists yet
                rows += len(members)
                if members:
                    need += len(members) * max(s.final_length for s in members)
            own = len(group._batch) + len(group._prefilling) + 1
            if rows > self.limits.max_batch or (own > 1 and not self.graph.has_position_ids):
                return False
            if need * self.graph.bytes_per_token > self.limits.kv_cache_bytes:
                return False
            self._approved[id(group)] = seq
            return True

    def decoding(self) -> None:
        """A group starts a decode step: count the sequences decoding at once, all groups."""
        self.max_rows_seen = max(self.max_rows_seen, sum(len(g._batch) for g in self.groups))

    def freed(self, group: SplitEngine) -> None:
        """Sequences left ``group``: the others' waiting sequences may fit now."""
        for other in self.groups:
            if other is not group:
                with other._cond:
                    other._cond.notify()

    # figures (tests, benchmarks) -----------------------------------------------------------

    @property
    def steps(self) -> int:
        return sum(g.steps for g in self.groups)

    @property
    def prefill_runs(self) -> int:
        return sum(g.prefill_runs for g in self.groups)

    @property
    def rebuilds(self) -> int:
        return sum(g.rebuilds for g in self.groups)
