"""The edge-cloud planner for a decoder cut between layers: prefill and decode priced apart.

A generation pays once for the prompt (time to first token) and then per token. For a cut
at boundary ``b`` (edge: embedding and layers ``< b``; cloud: the rest, or with ``private``
the LM head back on the edge):

- TTFT(b)  = edge prefill x edge factor + cloud prefill x cloud factor + RTT
             + (prompt x width x dtype up, last-position logits or hidden down) / bandwidth
- token(b) = edge decode x edge factor + cloud decode x cloud factor + RTT
             + (width x dtype + framing up, vocabulary or width x dtype down) / bandwidth

(the private split's cloud stage returns hidden states, not logits). The planner
picks the cut minimising TTFT + (output - 1) x token(b) and reports the predicted tokens/s;
unit costs are measured on this machine, one sub-model per unit (embedding, each layer,
head), prefill over the prompt and one decode step over it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtime.errors import BadRequest

FRAMING_BYTES = 640  # a V2 stage call's JSON header and ids, measured (docs/partitioning.md)


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


def measure_units(proto, prompt: int = 64, runs: int = 3) -> UnitCosts:
    """Time each unit's sub-model: a prefill of ``prompt`` tokens, then a decode step."""
    import onnxruntime as ort

    from .split import DecoderGraph, split_decoder

    layers = len(DecoderGraph(proto).layers)
    stages = split_decoder(proto, list(range(layers + 1)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    rng = np.random.default_rng(0)
    prefill, decode, width, vocab = [], [], 0, 0
    carry = rng.integers(0, 8, (1, prompt)).astype(np.int64)
    for stage in stages:
        sess = ort.InferenceSession(stage.model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
        args = {a.name: a for a in sess.get_inputs()}
        pasts = {}
        timings = []
        for phase, n, past in (("prefill", prompt, 0), ("decode", 1, prompt)):
            feed = {stage.carry_in: carry[:, :n] if phase == "prefill" else carry[:, -1:]}
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
            best = float("inf")
            for _ in range(runs):
                start = time.perf_counter()
                out = sess.run(stage.outputs, feed)
                best = min(best, time.perf_counter() - start)
            timings.append(best)
            if phase == "prefill":
                pasts = dict(zip(stage.past_names, out[1:]))
                next_carry = out[0]
        prefill.append(timings[0])
        decode.append(timings[1])
        if stage.carry_out == "logits":
            vocab = int(next_carry.shape[-1])
        else:
            width = int(next_carry.shape[-1])
        carry = next_carry
    return UnitCosts(prefill, decode, width, vocab)


def plan_cut(costs: UnitCosts, *, edge_factor: float = 4.0, cloud_factor: float = 1.0,
             bandwidth_bps: float = 10e6, rtt_s: float = 0.02, prompt: int = 64,
             output: int = 64, private: bool = False) -> dict:
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
        up_prefill, up_token = prompt * w * d + FRAMING_BYTES, w * d + FRAMING_BYTES
        down_prefill = (prompt * w * d if private else v * d) + FRAMING_BYTES
        down_token = (w if private else v) * d + FRAMING_BYTES
        ttft = (edge_factor * sum(costs.prefill[u] for u in edge)
                + cloud_factor * sum(costs.prefill[u] for u in cloud)
                + rtt_s + 8 * (up_prefill + down_prefill) / bandwidth_bps)
        token = (edge_factor * sum(costs.decode[u] for u in edge)
                 + cloud_factor * sum(costs.decode[u] for u in cloud)
                 + rtt_s + 8 * (up_token + down_token) / bandwidth_bps)
        rows.append({"cut": b, "ttft_s": ttft, "token_s": token, "tokens_per_s": 1.0 / token,
                     "total_s": ttft + (output - 1) * token,
                     "bytes_per_token": up_token + down_token})
    if not rows:
        raise BadRequest("a private split needs at least 2 layers")
    edge_only = {"ttft_s": edge_factor * sum(costs.prefill),
                 "token_s": edge_factor * sum(costs.decode)}
    best = min(rows, key=lambda r: r["total_s"])
    return {"cut": best["cut"], "predicted": {k: best[k] for k in ("ttft_s", "token_s",
                                                                     "tokens_per_s")},
            "edge_only": edge_only, "candidates": rows}
