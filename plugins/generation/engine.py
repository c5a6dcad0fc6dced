"""The decode loop with continuous (iteration-level) batching.

One scheduler thread per served model version owns the onnxruntime session and the running
batch's :class:`~.kv_cache.BatchCache`. Between two decode steps it admits waiting requests
(each prefilled alone, then merged into the batch) and lets finished, cancelled or timed-out
ones leave, so a long answer never holds a short one back. Admission is bounded by a KV-cache
budget in bytes: a sequence is admitted only if the batch, with it, can grow to every member's
final length inside the budget, so memory is reserved up front and never runs out mid-answer.
Request threads only queue a :class:`Sequence` and read its events.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from plugins.serving.turns import Outside
from runtime.errors import BadRequest, ServiceUnavailable, TooManyRequests

from .kv_cache import BatchCache
from .sampling import SamplingParams, apply_repetition_penalty, sample

log = logging.getLogger("shardserve.generation")

ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class GraphInfo:
    """What the engine needs to know about an exported decoder graph."""

    input_names: tuple[str, ...]
    past_names: list[str]  # past_key_values.{i}.key/.value, layer by layer
    present_names: list[str]
    has_position_ids: bool
    kv_heads: int
    head_dim: int
    dtype: type
    int32_inputs: tuple[str, ...] = ()  # index inputs the export declares as int32

    @property
    def layers(self) -> int:
        return len(self.past_names) // 2

    @property
    def bytes_per_token(self) -> int:
        return len(self.past_names) * self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class EngineLimits:
    """A model's ``[generation]`` settings that bound work and memory."""

    max_context: int
    kv_cache_bytes: int
    max_batch: int = 16
    max_queue: int = 64
    queue_timeout_s: float = 10.0
    prefill_chunk: int = 256  # prompt tokens run between two decode steps of the batch


class Sequence:
    """One request's generation: its tokens so far, its sampler and its event queue."""

    def __init__(self, prompt: list[int], max_tokens: int, sampling: SamplingParams,
                 eos_ids: frozenset[int], deadline: float | None = None):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.eos_ids = eos_ids
        self.deadline = deadline
        self.generated: list[int] = []
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.admitted = False
        self.finish_reason: str | None = None
        self.submitted = time.monotonic()
        self.admitted_at: float | None = None
        self.rng = np.random.default_rng(sampling.seed)
        self.next_token = -1  # sampled, not yet in the cache
        self.prefilled = 0  # prompt tokens already in ``own_cache`` (chunked prefill)
        self.own_cache: list[np.ndarray] | None = None

    @property
    def final_length(self) -> int:
        return len(self.prompt) + self.max_tokens

    @property
    def cached(self) -> int:
        """Tokens already in the KV cache: the prompt and all but the newest generated one."""
        return len(self.prompt) + len(self.generated) - 1


class Engine:
    """Continuous batching over one onnxruntime session."""

    # Whole prompts admitted together are prefilled in one run. Padding them needs explicit
    # positions (a graph without position_ids counts them from the cache's width).
    group_prefill = True

    def __init__(self, session, graph: GraphInfo, limits: EngineLimits, name: str):
        self.session = session
        self.graph = graph
        self.limits = limits
        self.name = name
        self._cond = threading.Condition()
        self._pending: deque[Sequence] = deque()
        self._batch: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # admitted, prompt not yet fully run
        self._cache = BatchCache(graph.past_names, graph.dtype)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (tests and metrics)
        self.prefill_runs = 0  # prompt chunks run
        self.max_rows_seen = 0
        self._outputs = ["logits", *graph.present_names]

    # request side -------------------------------------------------------------------------

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """400 for a request this model can never serve, whatever the load."""
        total = prompt_tokens + max_tokens
        if prompt_tokens == 0:
            raise BadRequest("the prompt is empty")
        if total > self.limits.max_context:
            raise BadRequest(f"the prompt has {prompt_tokens} tokens and max_tokens is "
                             f"{max_tokens}: {total} is over this model's context of "
                             f"{self.limits.max_context} tokens")
        need = total * self.graph.bytes_per_token
        if need > self.limits.kv_cache_bytes:
            raise BadRequest(f"prompt plus max_tokens needs {need} bytes of KV cache, over "
                             f"this model's budget of {self.limits.kv_cache_bytes} bytes")

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; 429 right away when the queue is full."""
        self.check(len(seq.prompt), seq.max_tokens)
        with self._cond:
            if self._closed:
                raise ServiceUnavailable(f"model {self.name!r} is unloading")
            if len(self._pending) >= self.limits.max_queue:
                raise TooManyRequests(f"model {self.name!r} is at capacity, retry later",
                                      headers={"Retry-After": "1"})
            self._pending.append(seq)
            if self._thread is None or not self._thread.is_alive():  # none yet, or it died
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=f"shardserve-generate-{self.name}")
                self._thread.start()
            self._cond.notify()

    def withdraw(self, seq: Sequence) -> bool:
        """Take a still-waiting sequence off the queue (True), or mark a running one to leave
        at the next step (False)."""
        with self._cond:
            seq.cancelled = True
            if not seq.admitted and seq in self._pending:
                self._pending.remove(seq)
                return True
            return False

    def _withdraw_waiting(self, seq: Sequence) -> bool:
        """Take a sequence off the queue only if it was never admitted (True); an admitted one
        is left running, so its consumer still gets its events."""
        with self._cond:
            if not seq.admitted and seq in self._pending:
                seq.cancelled = True
                self._pending.remove(seq)
                return True
            return False

    def events(self, seq: Sequence):
        """Yield ``("token", id)`` events then one ``("end", reason)``; 429 (Retry-After) if
        not admitted within the queue timeout. Closing the generator cancels the sequence."""
        try:
            first = True
            while True:
                if first:
                    try:  # the wait for admission and the first token: without the
                        with Outside():  # gthread worker's request turn (.serving.turns)
                            event = seq.events.get(timeout=self.limits.queue_timeout_s)
                    except queue.Empty:
                        if self._withdraw_waiting(seq):
                            raise TooManyRequests(
                                f"model {self.name!r} is at capacity, retry later",
                                headers={"Retry-After": str(max(1, int(
                                    self.limits.queue_timeout_s)))}) from None
                        with Outside():
                            event = seq.events.get()
                    first = False
                else:
                    with Outside():  # a non-streamed answer waits for every token here
                        event = seq.events.get()
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] == "end":
                    return
        finally:
            if seq.finish_reason is None:
                self.withdraw(seq)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    # scheduler side -----------------------------------------------------------------------

    def _fits(self, seq: Sequence) -> bool:
        members = self._batch + self._prefilling
        rows = len(members) + 1
        if rows > self.limits.max_batch:
            return False
        if rows > 1 and not self.graph.has_position_ids:
            return False  # the graph counts positions from the cache's width: no padding, alone
        longest = max([s.final_length for s in members] + [seq.final_length])
        return rows * longest * self.graph.bytes_per_token <= self.limits.kv_cache_bytes

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._closed and not self._pending and not self._batch
                       and not self._prefilling):
                    self._cond.wait()
                if self._closed:
                    self._fail_all(ServiceUnavailable(f"model {self.name!r} was unloaded"))
                    return
                while self._pending and self._fits(self._pending[0]):
                    seq = self._pending.popleft()
                    seq.admitted, seq.admitted_at = True, time.monotonic()
                    self._prefilling.append(seq)
            try:
                self._prefill_some()
                if self._batch:
                    self._decode()
                self._leave()
            except Exception as exc:  # a failed step ends the batch's requests, not the thread
                log.error("model %s: generation step failed: %s", self.name, type(exc).__name__)
                try:
                    self._fail_all(ServiceUnavailable(f"model {self.name!r} failed to generate"))
                except Exception as again:  # never let the scheduler thread die
                    log.error("model %s: failing the batch failed: %s", self.name,
                              type(again).__name__)
                    self._batch, self._prefilling = [], []

    def _fail_all(self, error: Exception) -> None:
        for seq in [*self._batch, *self._prefilling]:
            if seq.finish_reason is None:
                seq.finish_reason = "error"
                seq.events.put(("error", error))
        self._batch, self._prefilling = [], []
        self._cache.drop([])
        if self._closed:
            for seq in self._pending:
                seq.events.put(("error", error))
            self._pending.clear()

    def _run(self, feed: dict) -> tuple[np.ndarray, list[np.ndarray]]:
        for name in self.graph.int32_inputs:
            if name in feed:
                feed[name] = feed[name].astype(np.int32)
        results = self.session.run(self._outputs, feed)
        return results[0], results[1:]

    def _prefill_some(self) -> None:
        """Run up to ``prefill_chunk`` token-rows of the waiting sequences' prompts, oldest
        first, so a long prompt delays the running batch by one chunk per decode step, not by
        all of it (chunked prefill). A sequence whose prompt is done samples its first token
        and joins. Whole prompts of similar length (within 2x of each other) run as one padded
        batch, charged what that run computes, rows x the longest prompt, so padding never
        pushes the work between two decode steps over ``prefill_chunk``."""
        budget = self.limits.prefill_chunk
        groups: list[list[Sequence]] = []  # whole prompts, one graph run each
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.cancelled:
                self._cancelled(seq)
                self._prefilling.remove(seq)
                continue
            start = seq.prefilled
            if (self.group_prefill and self.graph.has_position_ids and start == 0
                    and len(seq.prompt) <= budget):
                budget -= self._add_to_group(groups, seq, budget)
                continue
            n = min(len(seq.prompt) - start, budget)
            budget -= n
            logits, presents = self._prefill_chunk(seq, start, n)
            seq.prefilled, seq.own_cache = start + n, presents
            if seq.prefilled < len(seq.prompt):
                continue
            self._prefilling.remove(seq)
            seq.own_cache = None
            if self._emit(seq, logits[0, -1]):
                self._batch.append(seq)
                self._cache.join(presents)
        for group in groups:
            if len(group) == 1:
                seq = group[0]
                logits, presents = self._prefill_chunk(seq, 0, len(seq.prompt))
                self._joined(group, logits, presents, [len(seq.prompt)])
            else:
                self._joined(group, *self._prefill_group(group), [len(s.prompt) for s in group])

    @staticmethod
    def _add_to_group(groups: list[list[Sequence]], seq: Sequence, budget: int) -> int:
        """Put a whole prompt (``len(seq.prompt) <= budget``) in the first group whose padded
        run it joins within 2x of every member's length and within ``budget``, else in a new
        group; return the token-rows it adds to the runs."""
        n = len(seq.prompt)
        for group in groups:
            lengths = [len(s.prompt) for s in group]
            width, shortest = max(lengths), min(lengths)
            added = (len(group) + 1) * max(width, n) - len(group) * width
            if max(width, n) <= 2 * min(shortest, n) and added <= budget:
                group.append(seq)
                return added
        groups.append([seq])
        return n

    def _joined(self, group: list[Sequence], logits: np.ndarray, presents: list[np.ndarray],
                lengths: list[int]) -> None:
        """Whole prompts prefilled (row ``i`` of ``presents`` holds ``group[i]``, right-aligned,
        ``lengths[i]`` valid columns): each samples its first token, those still going join."""
        seq_rows = []
        for row, seq in enumerate(group):
            self._prefilling.remove(seq)
            seq.prefilled, seq.own_cache = len(seq.prompt), None
            if self._emit(seq, logits[row, -1]):
                seq_rows.append(row)
                self._batch.append(seq)
        if seq_rows:
            self._cache.join([p[seq_rows] if len(seq_rows) < len(group) else p
                              for p in presents], [lengths[r] for r in seq_rows])

    def _prefill_group(self, group: list[Sequence]):
        """One graph run over several whole prompts, right-aligned: the shorter ones padded
        on the left with masked columns (positions still count from 0 at each prompt's start,
        so the keys cached are those of the prompt run alone)."""
        g = self.graph
        self.prefill_runs += 1
        width = max(len(s.prompt) for s in group)
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros((len(group), width), np.int64)
        positions = np.zeros((len(group), width), np.int64)
        for row, seq in enumerate(group):
            n = len(seq.prompt)
            ids[row, width - n:] = seq.prompt
            mask[row, width - n:] = 1
            positions[row, width - n:] = np.arange(n)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        empty = np.zeros((len(group), g.kv_heads, 0, g.head_dim), dtype=g.dtype)
        for name in g.past_names:
            feed[name] = empty
        return self._run(feed)

    def _prefill_chunk(self, seq: Sequence, start: int, n: int):
        g = self.graph
        self.prefill_runs += 1
        feed = {"input_ids": np.asarray([seq.prompt[start:start + n]], dtype=np.int64),
                "attention_mask": np.ones((1, start + n), np.int64)}
        if g.has_position_ids:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        if seq.own_cache is None:
            empty = np.zeros((1, g.kv_heads, 0, g.head_dim), dtype=g.dtype)
            for name in g.past_names:
                feed[name] = empty
        else:
            for name, array in zip(g.past_names, seq.own_cache):
                feed[name] = array
        return self._run(feed)

    def _decode(self) -> None:
        g, batch, cache = self.graph, self._batch, self._cache
        rows = len(batch)
        self.max_rows_seen = max(self.max_rows_seen, rows)
        mask = np.concatenate([cache.mask, np.ones((rows, 1), np.int64)], axis=1)
        feed = {"input_ids": np.asarray([[s.next_token] for s in batch], dtype=np.int64),
                "attention_mask": mask}  # int64: _run may give the graph an int32 copy
        if g.has_position_ids:
            feed["position_ids"] = np.asarray([[s.cached] for s in batch], dtype=np.int64)
        cache.feed(feed)
        logits, presents = self._run(feed)
        cache.step(presents, mask)
        self.steps += 1
        for seq, row in zip(batch, logits[:, -1]):
            if seq.finish_reason is None:
                self._emit(seq, row)

    def _emit(self, seq: Sequence, logits: np.ndarray) -> bool:
        """Sample and hand out one token; False when the sequence is finished."""
        now = time.monotonic()
        if seq.cancelled:
            self._cancelled(seq)
            return False
        if seq.deadline is not None and now > seq.deadline:
            return self._end(seq, "deadline")
        params = seq.sampling
        if params.repetition_penalty != 1.0:
            logits = logits.copy()
            apply_repetition_penalty(logits, np.asarray(seq.prompt + seq.generated),
                                     params.repetition_penalty)
        token = sample(logits, params, seq.rng)
        if token in seq.eos_ids:
            return self._end(seq, "eos_token")
        seq.generated.append(token)
        seq.next_token = token
        seq.events.put(("token", token))
        if len(seq.generated) >= seq.max_tokens:
            return self._end(seq, "length")
        return True

    def _end(self, seq: Sequence, reason: str) -> bool:
        seq.finish_reason = reason
        seq.events.put(("end", reason))
        return False

    def _cancelled(self, seq: Sequence) -> None:
        """A cancelled sequence leaves with an end event, so nothing can wait on it forever."""
        self._end(seq, "cancelled")

    def _leave(self) -> None:
        """Drop finished and cancelled sequences from the batch and its cache."""
        keep = [i for i, s in enumerate(self._batch)
                if s.finish_reason is None and not s.cancelled]
        if len(keep) != len(self._batch):
            for s in self._batch:
                if s.cancelled and s.finish_reason is None:
                    self._cancelled(s)
            self._batch = [self._batch[i] for i in keep]
            self._cache.drop(keep)
