"""The edge-cloud planner for a decoder cut between layers: prefill and decode priced apart.

A generation pays once for the prompt (time to first token) and then per token. For a cut
at boundary ``b`` (edge: embedding and layers ``< b``; cloud: the rest, or with ``private``
the LM head back on the edge):

- TTFT(b)  = edge prefill x edge factor + cloud prefill x cloud factor + RTT + call + step
             + (prompt x width x dtype + framing up, last-position logits or, private, the
             prompt's hidden states + framing down) / bandwidth
- token(b) = edge decode x edge factor + cloud decode x cloud factor + RTT + call + step
             + (width x dtype + framing up, vocabulary or width x dtype + framing down)
             / bandwidth

(the private split's cloud stage returns hidden states, not logits). ``call`` is what one
remote stage call costs besides compute and the link: encoding and decoding the V2 request
and answer on both ends, the HTTP exchange and the serving node's dispatch, measured over
loopback (``-o call_overhead=``); ``step`` is the scheduler's own time per step (sampling,
events, feeding the stages: ``-o step_overhead=``); benchmarks/lm_split_link.py measures
both. The planner picks the cut minimising TTFT + (output - 1) x token(b) and reports the
predicted tokens/s; unit costs are measured on this machine, one sub-model per unit
(embedding, each layer, head), prefill over the prompt and one decode step over it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtime.errors import BadRequest

# Measured on the 2-core development machine (benchmarks/lm_split_link.py, width 768, fp32):
FRAMING_UP = 650  # a decode call's V2 JSON header, ids and request id besides the hidden state
FRAMING_DOWN = 200  # its answer's header besides the logits or hidden state
CALL_OVERHEAD_S = 0.0015  # one stage call over HTTP, both ends, at a 20 ms RTT, no compute
STEP_OVERHEAD_S = 0.0002  # the scheduler's per-step work besides running the stages


@dataclass
class UnitCosts:
    """Seconds per unit on this machine: index 0 the embedding, 1..L the layers, L+1 the head."""

    prefill: list[float]
    decode: list[float]
    width: int
    vocab: int
    dtype_bytes: int = 4

    @property
    def layers(self) -> int:
        return len(self.prefill) - 2


def measure_units(proto, prompt: int = 64, runs: int = 5) -> UnitCosts:
    """Time each unit's sub-model: a prefill of ``prompt`` tokens, then a decode step.

    Each run is a whole forward pass, unit after unit (a prefill pass, then a decode pass
    over its caches), and each unit's time is the median of its runs: a unit runs after the
    others as it does when served, so a model larger than the CPU caches is timed with its
    weights cold, as served (timing one layer several times in a row keeps its weights in the
    L3 cache and underestimates a memory-bound decode step), and the median, unlike the
    best run, keeps the share of the CPU a busy machine gives it.
    """
    import onnxruntime as ort

    from .split import DecoderGraph, split_decoder

    layers = len(DecoderGraph(proto).layers)
    stages = split_decoder(proto, list(range(layers + 1)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(stage.model.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"]) for stage in stages]
    ids = np.random.default_rng(0).integers(0, 8, (1, prompt)).astype(np.int64)
    prefill: list[list[float]] = [[] for _ in stages]
    decode: list[list[float]] = [[] for _ in stages]
    width = vocab = 0
    for _ in range(runs):
        pasts: list[dict] = []
        carry = ids
        for i, (stage, sess) in enumerate(zip(stages, sessions)):
            elapsed, out = _timed(stage, sess, carry, prompt, 0, {})
            prefill[i].append(elapsed)
            pasts.append(dict(zip(stage.past_names, out[1:])))
            carry = out[0]
            if stage.carry_out == "logits":
                vocab = int(carry.shape[-1])
            else:
                width = int(carry.shape[-1])
        carry = ids[:, -1:]
        for i, (stage, sess) in enumerate(zip(stages, sessions)):
            elapsed, out = _timed(stage, sess, carry, 1, prompt, pasts[i])
            decode[i].append(elapsed)
            carry = out[0]
    return UnitCosts([float(np.median(t)) for t in prefill],
                     [float(np.median(t)) for t in decode], width, vocab)


def _timed(stage, sess, carry: np.ndarray, n: int, past: int, pasts: dict):
    """One run of a unit over ``n`` new positions after ``past`` cached ones: (s, outputs)."""
    args = {a.name: a for a in sess.get_inputs()}
    feed = {stage.carry_in: carry}
    if "attention_mask" in args:
        feed["attention_mask"] = np.ones((1, past + n), np.int64)
    if "position_ids" in args:
        feed["position_ids"] = np.arange(past, past + n, dtype=np.int64)[None]
    for name in stage.past_names:
        shape = args[name].shape
        feed[name] = pasts.get(name, np.zeros((1, shape[1], past, shape[3]), np.float32))
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name in feed and args[name].type == "tensor(int32)":
            feed[name] = feed[name].astype(np.int32)
    start = time.perf_counter()
    out = sess.run(stage.outputs, feed)
    return time.perf_counter() - start, out


def plan_cut(costs: UnitCosts, *, edge_factor: float = 4.0, cloud_factor: float = 1.0,
             bandwidth_bps: float = 10e6, rtt_s: float = 0.02, prompt: int = 64,
             output: int = 64, private: bool = False, call_s: float = CALL_OVERHEAD_S,
             step_s: float = STEP_OVERHEAD_S) -> dict:
    """The best cut and every candidate's predicted TTFT, per-token latency and tokens/s."""
    if prompt < 1 or output < 1:
        raise BadRequest("prompt and output lengths must be at least 1")
    L, w, v, d = costs.layers, costs.width, costs.vocab, costs.dtype_bytes
    rows = []
    for b in range(1, L) if private else range(0, L + 1):
        edge = list(range(0, b + 1)) + ([L + 1] if private else [])  # units 0..b (+ head)
        cloud = [u for u in range(L + 2) if u not in edge]
        # One round trip per call: hidden states up; logits (the last position's, for a
        # prefill) or, private, hidden states down.
        up_prefill, up_token = prompt * w * d + FRAMING_UP, w * d + FRAMING_UP
        down_prefill = (prompt * w * d if private else v * d) + FRAMING_DOWN
        down_token = (w if private else v) * d + FRAMING_DOWN
        ttft = (edge_factor * sum(costs.prefill[u] for u in edge)
                + cloud_factor * sum(costs.prefill[u] for u in cloud)
                + rtt_s + call_s + step_s + 8 * (up_prefill + down_prefill) / bandwidth_bps)
        token = (edge_factor * sum(costs.decode[u] for u in edge)
                 + cloud_factor * sum(costs.decode[u] for u in cloud)
                 + rtt_s + call_s + step_s + 8 * (up_token + down_token) / bandwidth_bps)
        rows.append({"cut": b, "ttft_s": ttft, "token_s": token, "tokens_per_s": 1.0 / token,
                     "total_s": ttft + (output - 1) * token,
                     "bytes_per_token": up_token + down_token})
    if not rows:
        raise BadRequest("a private split needs at least 2 layers")
    edge_only = {"ttft_s": edge_factor * sum(costs.prefill) + step_s,
                 "token_s": edge_factor * sum(costs.decode) + step_s}
    best = min(rows, key=lambda r: r["total_s"])
    return {"cut": best["cut"], "predicted": {k: best[k] for k in ("ttft_s", "token_s",
                                                                     "tokens_per_s")},
            "edge_only": edge_only, "candidates": rows}
