"""Generation over a decoder split into layer stages, each keeping its own layers' KV cache.

The scheduler (:class:`SplitEngine`, the same continuous-batching loop as
:class:`~.engine.Engine`) drives the stages in order and holds no key or value: per decode step
it hands each stage the row ids of the running batch and the carried tensor (stage 0: the
next tokens; then one hidden state per sequence), and gets the next carried tensor back. A
stage (:class:`LayerStage`) owns a :class:`~.kv_cache.BatchCache` of its layers and derives
the attention mask and position ids from it, so nothing but the hidden state crosses a cut.

The stage protocol is three calls, ``prefill(seq, start, carry)``, ``decode(rows, carry)`` and
``release(seqs)``, keyed by sequence id, so a stage can live in another process: a stage
reconciles its batch with ``rows`` on every decode (rows that left are dropped, prefilled
sequences named at the end join), and a sequence it does not know is a clear error the
caller can answer by rebuilding the cache from the tokens so far.

Releasing costs an in-process stage nothing, so it is done at once; a stage elsewhere would
cost the scheduler a round trip per finished stream, before the next request's prefill and
every other stream's next step. There the finished sequences wait: a stage with
``release_later(seqs)`` (a remote node, a Lambda function) keeps them and sends them with its
next ``prefill`` or ``decode`` (one round trip for both), and ``release_waiting()`` sends what
is left; a stage without it (a Dask actor) gets ``release`` calls. Whatever is still waiting
``RELEASE_DELAY_S`` after a stream finished (the stages went idle) is released by a timer
thread, off the scheduler's path. Sequence ids are never reused: a late release is harmless.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from runtime.errors import ServiceUnavailable, ShardserveError

from .engine import ORT_FLOAT, Engine, EngineLimits, GraphInfo
from .kv_cache import BatchCache
from .stage_hops import tally

log = logging.getLogger("shardserve.generation")

RELEASE_DELAY_S = 0.02  # a stage elsewhere: finished sequences wait this long for a call


class UnknownSequence(ServiceUnavailable):
    """A stage was asked to decode a sequence whose cache it does not hold."""


class StageLost(UnknownSequence):
    """A stage's node failed and a replica took over: it holds no cache yet."""


@dataclass(frozen=True)
class Hop:
    """One carried tensor crossing into a stage: what a cut costs per step."""

    stage: int
    phase: str  # "prefill" or "decode"
    rows: int
    tokens: int  # positions per row (1 when decoding)
    nbytes: int  # the tensor's payload, without framing
    wire_sent: int = 0  # bytes of the whole request on the wire (remote stages: + framing)
    wire_received: int = 0


class LayerStage:
    """One stage in process: an onnxruntime session over its sub-model and its layers' cache."""

    def __init__(self, spec, session=None, intra_op_threads: int = 0):
        if session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if intra_op_threads:
                options.intra_op_num_threads = intra_op_threads
            session = ort.InferenceSession(spec.model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
        self.spec = spec
        self.index = spec.index
        self.session = session
        self.inputs = {a.name: a for a in session.get_inputs()}
        self.past_names = spec.past_names
        self.present_names = spec.present_names
        self.outputs = [spec.carry_out, *self.present_names]
        dtype = np.float32
        self.kv_shape = None
        if self.past_names:
            first = self.inputs[self.past_names[0]]
            dtype = ORT_FLOAT.get(first.type, np.float32)
            self.kv_shape = (first.shape[1], first.shape[3])
        self.dtype = dtype
        # per step: which optional inputs the graph takes, which of them as int32
        self._takes_mask = "attention_mask" in self.inputs
        self._takes_positions = "position_ids" in self.inputs
        self._int32 = [name for name in ("input_ids", "attention_mask", "position_ids")
                       if name in self.inputs and self.inputs[name].type == "tensor(int32)"]
        self.cache = BatchCache(self.past_names, dtype)
        self.rows: list[str] = []
        self.lengths: list[int] = []  # cached positions per row (the next position id)
        self.prefilling: dict[str, tuple[int, list[np.ndarray]]] = {}
        self.lock = threading.Lock()

    def _feed(self, carry: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict:
        feed = {self.spec.carry_in: carry}
        if self._takes_mask:
            feed["attention_mask"] = mask
        if self._takes_positions:
            feed["position_ids"] = positions
        for name in self._int32:
            if name in feed:
                feed[name] = feed[name].astype(np.int32)
        return feed

    def _empty(self) -> list[np.ndarray]:
        heads, dim = self.kv_shape or (1, 1)
        empty = np.zeros((1, heads, 0, dim), self.dtype)
        return [empty for _ in self.past_names]

    def prefill(self, seq: str, start: int, carry: np.ndarray) -> np.ndarray:
        """Run prompt positions ``start..start+n`` of one sequence (``carry``: batch 1)."""
        with self.lock:
            n = carry.shape[1]
            held = self.prefilling.get(seq) if start else None
            if start and (held is None or held[0] != start):
                raise UnknownSequence(f"stage {self.index} holds no cache for this sequence")
            past = held[1] if held else None
            feed = self._feed(carry, np.ones((1, start + n), np.int64),
                              np.arange(start, start + n, dtype=np.int64)[None])
            for name, array in zip(self.past_names, past or self._empty()):
                feed[name] = array
            out = self.session.run(self.outputs, feed)
            self.prefilling[seq] = (start + n, out[1:])
            if self.spec.carry_out == "logits":  # only the last position is sampled from
                return out[0][:, -1:]
            return out[0]

    def decode(self, rows: list[str], carry: np.ndarray) -> np.ndarray:
        """One decode step of the running batch, rows in ``rows`` order."""
        with self.lock:
            if rows != self.rows:  # the usual step: the same batch as the last one
                self._reconcile(rows)
            cache = self.cache
            positions = np.asarray(self.lengths, np.int64)[:, None]
            if self.past_names:
                mask = np.concatenate([cache.mask, np.ones((len(rows), 1), np.int64)], axis=1)
            elif self._takes_mask:  # no layers, no cache: the mask a cache would have
                width = int(positions.max()) + 1  # (right-aligned)
                mask = (np.arange(width)[None] >= width - positions - 1).astype(np.int64)
            else:
                mask = None
            feed = self._feed(carry, mask, positions)
            cache.feed(feed)
            out = self.session.run(self.outputs, feed)
            if self.past_names:
                cache.step(out[1:], mask)
            self.lengths = [n + 1 for n in self.lengths]
            return out[0]

    def _reconcile(self, rows: list[str]) -> None:
        wanted = set(rows)
        keep = [i for i, r in enumerate(self.rows) if r in wanted]
        if len(keep) != len(self.rows):
            self._drop(keep)
        joining = rows[len(self.rows):]
        if rows[:len(self.rows)] != self.rows or any(r not in self.prefilling for r in joining):
            raise UnknownSequence(f"stage {self.index} holds no cache for a sequence of this "
                                  "batch")
        for seq in joining:
            length, presents = self.prefilling.pop(seq)
            if self.past_names:
                self.cache.join(presents)
            self.rows.append(seq)
            self.lengths.append(length)

    def _drop(self, keep: list[int]) -> None:
        if self.past_names:
            self.cache.drop(keep)
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]

    def release(self, seqs: list[str]) -> None:
        """Forget sequences that finished or left (their prefill or batch cache)."""
        with self.lock:
            gone = set(seqs)
            for seq in gone:
                self.prefilling.pop(seq, None)
            if gone & set(self.rows):
                self._drop([i for i, r in enumerate(self.rows) if r not in gone])

    def compute(self, carry: np.ndarray) -> np.ndarray:
        """Positions ``0..n`` of one sequence from scratch, storing nothing (a rebuild's
        way to a later stage's input)."""
        with self.lock:
            n = carry.shape[1]
            feed = self._feed(carry, np.ones((1, n), np.int64),
                              np.arange(n, dtype=np.int64)[None])
            for name, array in zip(self.past_names, self._empty()):
                feed[name] = array
            return self.session.run(self.outputs, feed)[0]

    def reset(self) -> None:
        with self.lock:
            self.cache = BatchCache(self.past_names, self.dtype)
            self.rows, self.lengths, self.prefilling = [], [], {}

    def cache_bytes(self) -> int:
        with self.lock:
            return self.cache.nbytes() + sum(a.nbytes for _, p in self.prefilling.values()
                                             for a in p)


class _NoCache:
    """The scheduler's cache slot: with split stages it holds nothing."""

    def join(self, presents) -> None:
        pass

    def drop(self, keep) -> None:
        pass


class SplitEngine(Engine):
    """Continuous batching over stages that each keep their own layers' KV cache."""

    group_prefill = False  # each stage prefills one sequence at a time (its own _prefill_chunk)

    def __init__(self, stages: list, graph: GraphInfo, limits: EngineLimits, name: str,
                 hop_records: int = 4096, pipeline=None):
        super().__init__(None, graph, limits, name)
        self.stages = stages
        self._cache = _NoCache()
        self._ids: dict[object, str] = {}
        self._counter = itertools.count()
        # A group of a pipelined engine (split_pipeline.py): its stage calls take that
        # stage's lock, and memory and rows are counted over all groups.
        self.pipeline = pipeline
        self.hops: deque[Hop] = pipeline.hops if pipeline else deque(maxlen=hop_records)
        self._stage_error: ShardserveError | None = None
        self.rebuilds = 0  # times the stages' caches were rebuilt from tokens
        self._failed_stage = 0
        self._failed_carry: np.ndarray | None = None
        # finished sequences not released yet, per stage (stages elsewhere only)
        self._releases: list[list[str]] = [[] for _ in stages]
        self._release_lock = threading.Lock()
        self._release_timer: threading.Timer | None = None

    def _id(self, seq) -> str:
        key = self._ids.get(seq)
        if key is None:
            key = self._ids[seq] = f"s{next(self._counter)}"
        return key

    def _on(self, position: int, method, *args):
        """A stage call; in a pipelined engine it waits for that stage to be free, so each
        stage works on one group at a time while the others move on (a stage that orders its
        own calls has no lock: see :class:`~.split_pipeline.PipelinedEngine`)."""
        lock = self.pipeline.locks[position] if self.pipeline is not None else None
        if lock is None:
            return method(*args)
        with lock:
            return method(*args)

    def _through(self, carry: np.ndarray, phase: str, call, first: int = 0,
                 seqs=()) -> np.ndarray:
        for position in range(first, len(self.stages)):
            stage, sent = self.stages[position], carry
            try:
                carry = self._on(position, call, stage, carry)
            except ShardserveError as exc:  # its message names the stage and is safe to show
                self._stage_error, self._failed_stage = exc, position
                self._failed_carry = sent
                raise
            if position:  # what crossed the cut into this stage
                wire = getattr(stage, "last_wire", (0, 0))
                hop = Hop(stage.index, phase, sent.shape[0], sent.shape[1],
                          int(sent.nbytes), *wire)
                self.hops.append(hop)
                tally(seqs, hop)  # each request's share, for its access-log line
        return carry

    def _prefill_chunk(self, seq, start: int, n: int):
        self.prefill_runs += 1
        key = self._id(seq)
        ids = np.asarray([seq.prompt[start:start + n]], dtype=np.int64)
        try:
            logits = self._through(ids, "prefill", lambda st, c: st.prefill(key, start, c),
                                   seqs=(seq,))
        except UnknownSequence:  # a stage lost its caches: rebuild, then this prompt from 0
            self._stage_error = None
            self._rebuild()
            ids = np.asarray([seq.prompt[:start + n]], dtype=np.int64)
            logits = self._through(ids, "prefill", lambda st, c: st.prefill(key, 0, c),
                                   seqs=(seq,))
        return logits, ()

    def _decode(self) -> None:
        batch = self._batch
        self.max_rows_seen = max(self.max_rows_seen, len(batch))
        if self.pipeline is not None:
            self.pipeline.decoding()
        rows = [self._id(s) for s in batch]
        ids = np.asarray([[s.next_token] for s in batch], dtype=np.int64)
        try:
            logits = self._through(ids, "decode", lambda st, c: st.decode(rows, c),
                                   seqs=batch)
        except UnknownSequence:  # a replica took over, or a stateless node forgot: rebuild
            # The stages before the lost one have run this step already: resume at it.
            self._stage_error = None
            lost, carry = self._failed_stage, self._failed_carry
            self._rebuild()
            logits = self._through(carry, "decode", lambda st, c: st.decode(rows, c), lost,
                                   batch)
        self.steps += 1
        for seq, row in zip(batch, logits[:, -1]):
            if seq.finish_reason is None:
                self._emit(seq, row)

    def _rebuild(self) -> None:
        """Give every stage's caches back the running batch, from the tokens so far.

        Each sequence's cached tokens (its prompt and all but its newest token) run through the
        stages before the one that lost its caches without storing anything (``compute``), and
        are prefilled on that one, where they join its batch at the next decode. Correct and
        slower: one prefill per running sequence (docs/partitioning.md).
        """
        self.rebuilds += 1
        lost = self._failed_stage
        for seq in self._batch:
            carry = np.asarray([(seq.prompt + seq.generated)[:seq.cached]], dtype=np.int64)
            for position, stage in enumerate(self.stages[:lost]):
                carry = self._on(position, stage.compute, carry)
            self._on(lost, self.stages[lost].prefill, self._id(seq), 0, carry)

    def _fits(self, seq) -> bool:
        if self.pipeline is None:
            return super()._fits(seq)
        return self.pipeline.fits(self, seq)

    def _prefill_some(self) -> None:
        if self.pipeline is not None and self._pending and not self._batch \
                and not self._prefilling:  # other groups hold the budget: wait for them
            with self._cond:
                self._cond.wait(0.01)
            return
        super()._prefill_some()

    def _leave(self) -> None:
        super()._leave()
        live = set(self._batch) | set(self._prefilling)
        gone = [s for s in self._ids if s not in live and s.finish_reason is not None]
        if gone:
            keys = [self._ids.pop(s) for s in gone]
            later = False
            for position, stage in enumerate(self.stages):
                if isinstance(stage, LayerStage):  # in process: no round trip, at once
                    self._on(position, _guarded, stage, "release", keys)
                    continue
                later = True  # on the stage's next call, or by the timer (module docstring)
                if hasattr(stage, "release_later"):
                    stage.release_later(keys)
                else:
                    with self._release_lock:
                        self._releases[position] = self._releases[position] + keys
            if later:
                self._release_soon()
            if self.pipeline is not None:
                self.pipeline.freed(self)

    def _release_soon(self) -> None:
        with self._release_lock:
            if self._release_timer is not None or self._closed:
                return
            timer = self._release_timer = threading.Timer(RELEASE_DELAY_S,
                                                          self._release_waiting)
        timer.daemon = True
        timer.start()

    def _release_waiting(self) -> None:
        """The timer: release what no call has taken (off the scheduler thread)."""
        with self._release_lock:
            self._release_timer = None
            waiting, self._releases = self._releases, [[] for _ in self.stages]
        for position, (stage, keys) in enumerate(zip(self.stages, waiting)):
            if keys:
                self._on(position, _guarded, stage, "release", keys)
            elif hasattr(stage, "release_waiting"):
                self._on(position, _guarded, stage, "release_waiting")

    def close(self) -> None:
        super().close()
        with self._release_lock:
            timer, self._release_timer = self._release_timer, None
        if timer is not None:
            timer.cancel()
        self._release_waiting()  # nodes that outlive this engine keep no finished caches
        for stage in self.stages:  # pools, Dask clients
            close = getattr(stage, "close", None)
            if close is not None:
                close()

    def _fail_all(self, error: Exception) -> None:
        if self._stage_error is not None and not self._closed:
            error, self._stage_error = self._stage_error, None
        super()._fail_all(error)
        self._ids.clear()
        with self._release_lock:  # reset forgets them anyway
            self._releases = [[] for _ in self.stages]
        for stage in self.stages:
            _guarded(stage, "reset")


def _guarded(stage, method: str, *args) -> None:
    """Call a stage's housekeeping (``release``, ``reset``): a stage that cannot answer (a dead
    Dask worker, a remote that is down) is logged and skipped, so the scheduler thread keeps
    serving; a stage that forgot sequences is rebuilt or answers 503 on its next real call."""
    try:
        getattr(stage, method)(*args)
    except Exception as exc:
        log.warning("stage %s: %s failed: %s", getattr(stage, "index", "?"), method,
                    type(exc).__name__)


def graph_info_of(stages: list) -> GraphInfo:
    """The scheduler's view of the whole decoder, from its stages' inputs."""
    past, present, heads, dim, dtype = [], [], None, None, np.float32
    for stage in stages:
        past += stage.past_names
        present += stage.present_names
        if stage.kv_shape is not None:
            heads, dim = stage.kv_shape
            dtype = stage.dtype
    names = tuple(n for s in stages for n in s.inputs)
    # Without position ids a stage counts positions from its cache's width: no padded batch.
    return GraphInfo(names, past, present, "position_ids" in names, heads, dim, dtype)


def split_generation_model(model, cuts: list[int], intra_op_threads: int = 0,
                           pipeline_groups: int = 1):
    """Swap a loaded :class:`~.model.GenerationModel`'s engine for one over in-process stages
    of its own graph cut at boundaries ``cuts`` (read through the model-bytes hooks); with
    ``pipeline_groups`` > 1 the running sequences are split into that many groups, each with
    its own stages over the same sessions, pipelined (:mod:`.split_pipeline`)."""
    import onnx

    from .split import split_decoder

    while "engine" not in vars(model) and "backend" in vars(model):  # serving wrappers
        model = model.backend
    proto = onnx.load_from_string(model.settings.read_bytes(model.settings.config.filename))
    stages = [LayerStage(spec, intra_op_threads=intra_op_threads)
              for spec in split_decoder(proto, cuts)]
    groups = [stages] + [[LayerStage(s.spec, s.session) for s in stages]
                         for _ in range(pipeline_groups - 1)]
    old = model.engine
    old.close()
    model.engine = engine_over(groups, graph_info_of(stages), old.limits, old.name)
    return model.engine


def engine_over(groups: list[list], graph: GraphInfo, limits: EngineLimits, name: str):
    """A :class:`SplitEngine` over one group of stages, a pipelined engine over several."""
    if len(groups) == 1:
        return SplitEngine(groups[0], graph, limits, name)
    from .split_pipeline import PipelinedEngine

    return PipelinedEngine(groups, graph, limits, name)
