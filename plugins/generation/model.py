"""A text-generation model: an exported decoder graph with its tokenizer, served as a backend
that may stream (``generate``).

A version folder holds what ``optimum-cli export onnx --task text-generation-with-past`` writes
(model.onnx, config.json, generation_config.json) plus tokenizer.json and, for chat,
tokenizer_config.json. It is recognised by its graph signature (``input_ids``,
``attention_mask``, ``past_key_values.{i}.key/value`` -> ``logits``, ``present.{i}.*``) or by
``task = "text-generation"`` in model.toml. Settings live in model.toml's ``[generation]``:

```toml
[generation]
max_context = 1024          # tokens; default: config.json's max_position_embeddings
max_tokens_cap = 512        # the most a request may ask for
default_max_tokens = 64
kv_cache_bytes = 268435456  # KV-cache budget of the running batch (default 256 MiB),
# or kv_cache_tokens = 8192 # the same budget in tokens (bytes per token from the graph)
max_batch = 16              # sequences decoded together
max_queue = 64              # waiting requests before an immediate 429
queue_timeout_s = 10        # waiting longer than this answers 429 with Retry-After
prefill_chunk = 256         # prompt tokens run between two decode steps (chunked prefill)
attention_rewrite = true    # load the graph with GQA attention reading the un-repeated KV cache
```
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from runtime import TensorSpec
from runtime.errors import BadRequest, ModelLoadError

from .engine import ORT_FLOAT, Engine, EngineLimits, GraphInfo, Sequence
from .metrics import observe_sequence
from .sampling import SamplingParams
from .stage_hops import attach as attach_hops
from .text import Detokenizer, TextCodec

TASK = "text-generation"
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
SETTINGS = {"max_context": int, "max_tokens_cap": int, "default_max_tokens": int,
            "kv_cache_bytes": int, "kv_cache_tokens": int, "max_batch": int, "max_queue": int,
            "queue_timeout_s": float, "prefill_chunk": int}
MAX_STOP = 16
SAMPLING_RANGES = {"temperature": (0.0, 2.0), "top_k": (0, 1 << 20), "top_p": (0.0, 1.0),
                   "repetition_penalty": (0.0, 10.0)}


def is_text_generation(input_names: list[str], output_names: list[str]) -> bool:
    """True for a decoder graph with past key/values in Hugging Face's export layout."""
    ins, outs = set(input_names), set(output_names)
    return ({"input_ids", "attention_mask"} <= ins and "logits" in outs
            and any(PAST.fullmatch(n) for n in ins)
            and any(n.startswith("present.") for n in outs))


def graph_info(session, model: str, hf_config: dict) -> GraphInfo:
    inputs = {a.name: a for a in session.get_inputs()}
    outputs = [a.name for a in session.get_outputs()]
    layers = sorted({int(m.group(1)) for n in inputs if (m := PAST.fullmatch(n))})
    past = [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]
    missing = [n for n in past if n not in inputs] + [n for n in present if n not in outputs]
    extra = set(inputs) - set(past) - {"input_ids", "attention_mask", "position_ids"}
    if missing or extra or layers != list(range(len(layers))):
        raise ModelLoadError(f"model {model!r}: the decoder graph's past/present tensors do not "
                             "follow the text-generation-with-past layout")
    first = inputs[past[0]]
    dtype = ORT_FLOAT.get(first.type)
    heads, dim = first.shape[1], first.shape[3]
    if not isinstance(heads, int):
        heads = hf_config.get("num_key_value_heads") or hf_config.get("n_head")
    if not isinstance(dim, int):
        width = hf_config.get("hidden_size") or hf_config.get("n_embd")
        n_heads = hf_config.get("num_attention_heads") or hf_config.get("n_head")
        dim = hf_config.get("head_dim") or (width // n_heads if width and n_heads else None)
    if dtype is None or not isinstance(heads, int) or not isinstance(dim, int):
        raise ModelLoadError(f"model {model!r}: cannot tell the KV cache's shape or type")
    int32 = tuple(n for n in ("input_ids", "attention_mask", "position_ids")
                  if n in inputs and inputs[n].type == "tensor(int32)")
    return GraphInfo(tuple(inputs), past, present, "position_ids" in inputs, heads, dim, dtype,
                     int32)


@dataclass
class GenerateRequest:
    """One generation request, whichever API it came through (validated)."""

    prompt: str
    max_tokens: int | None  # None: the default, shortened to fit the context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()


def _number(params: dict, key: str, low: float, high: float, default, integer: bool = False,
            low_open: bool = False):
    value = params.get(key)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not np.isfinite(value) or value > high or (
            value <= low if low_open else value < low):
        kind = "an integer" if integer else "a number"
        bound = f"> {low}" if low_open else f">= {low}"
        raise BadRequest(f"{key!r} must be {kind} {bound} and <= {high}")
    return int(value) if integer else float(value)


class GenerationModel:
    """The backend of a text-generation model version (it wraps the onnxruntime backend that
    loaded the graph and reuses its session)."""

    task = TASK

    def __init__(self, settings, backend):
        self.settings = settings
        self.inner = backend
        self.platform = getattr(backend, "platform", "onnxruntime_onnx")
        self.inputs = [TensorSpec("text_input", "BYTES", [1])]
        self.outputs = [TensorSpec("text_output", "BYTES", [1])]
        s = settings
        session = getattr(backend, "session", None)
        stages = None
        if session is None and getattr(backend, "plan", None) is not None:
            from .split_loading import StageSignature, stages_of_plan  # a decoder cut by layers

            stages = stages_of_plan(s)
            session = StageSignature(stages)
            backend.close()  # the stages hold their own sessions: no weights twice in memory
        if session is None:
            raise ModelLoadError(f"model {s.model!r}: text generation needs the onnxruntime "
                                 "backend")
        files = {p.name for p in s.path.iterdir() if p.is_file()}
        hf_config = self._json("config.json", files)
        gen_config = self._json("generation_config.json", files)
        self.codec = TextCodec(s.read_bytes, s.model, files)
        self.graph = graph_info(session, s.model, hf_config)
        options = s.config.raw.get("generation", {})
        if not isinstance(options, dict):
            raise ModelLoadError(f"model {s.model!r}: [generation] must be a table")
        unknown = set(options) - set(SETTINGS) - {"attention_rewrite"}
        if unknown:
            raise ModelLoadError(f"model {s.model!r}: unknown [generation] keys {sorted(unknown)}")
        if not isinstance(options.get("attention_rewrite", True), bool):
            raise ModelLoadError(f"model {s.model!r}: [generation] attention_rewrite must be "
                                 "true or false")
        for key, kind in SETTINGS.items():
            value = options.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or (kind is int and not isinstance(value, int))
                                      or value <= 0):
                raise ModelLoadError(f"model {s.model!r}: [generation] {key} must be a "
                                     "positive number")
        context = (options.get("max_context") or hf_config.get("max_position_embeddings")
                   or hf_config.get("n_positions") or 2048)
        self.max_tokens_cap = int(options.get("max_tokens_cap", min(context, 1024)))
        self.default_max_tokens = int(options.get("default_max_tokens",
                                                  min(64, self.max_tokens_cap)))
        if stages is None:
            make_engine = Engine
        else:
            from .split_loading import stages_engine

            make_engine = stages_engine(stages)
        self.engine = make_engine(session, self.graph, EngineLimits(
            max_context=int(context),
            kv_cache_bytes=self._kv_budget(options),
            max_batch=int(options.get("max_batch", 16)),
            max_queue=int(options.get("max_queue", 64)),
            queue_timeout_s=float(options.get("queue_timeout_s", 10.0)),
            prefill_chunk=int(options.get("prefill_chunk", 256))), s.model)
        self.eos_ids = self._eos_ids(hf_config, gen_config)
        # The model's own sampling defaults (as vLLM reads them), for what a request leaves out.
        self.defaults = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
        for key in self.defaults:
            value = gen_config.get(key)
            try:
                self.defaults[key] = _number({key: value}, key, *SAMPLING_RANGES[key], None,
                                             integer=key == "top_k",
                                             low_open=key in ("top_p", "repetition_penalty")
                                             ) if value is not None else self.defaults[key]
            except BadRequest:
                raise ModelLoadError(f"model {s.model!r}: generation_config.json {key} is out "
                                     "of range") from None

    def _kv_budget(self, options: dict) -> int:
        if "kv_cache_bytes" in options and "kv_cache_tokens" in options:
            raise ModelLoadError(f"model {self.settings.model!r}: [generation] takes "
                                 "kv_cache_bytes or kv_cache_tokens, not both")
        if "kv_cache_tokens" in options:
            return int(options["kv_cache_tokens"]) * self.graph.bytes_per_token
        return int(options.get("kv_cache_bytes", 256 << 20))

    def _json(self, name: str, files: set[str]) -> dict:
        if name not in files:
            return {}
        try:
            value = json.loads(self.settings.read_bytes(name))
        except ValueError:
            raise ModelLoadError(f"model {self.settings.model!r}: {name} is not JSON") from None
        return value if isinstance(value, dict) else {}

    def _eos_ids(self, hf_config: dict, gen_config: dict) -> frozenset[int]:
        ids: set[int] = set()
        for source in (gen_config, hf_config):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        eos = self.codec.token_id(self.codec.eos_token)
        if eos is not None:
            ids.add(eos)
        return frozenset(ids)

    # requests ------------------------------------------------------------------------------

    def parse(self, params: dict, prompt: str, allowed: set[str]) -> GenerateRequest:
        """Validate sampling parameters shared by every API (400 on anything off)."""
        unknown = set(params) - allowed
        if unknown:
            raise BadRequest(f"unknown or unsupported parameters: {', '.join(sorted(unknown))}")
        if not isinstance(prompt, str):
            raise BadRequest("the prompt must be a string")
        cap = self.max_tokens_cap
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            max_tokens = params.get("max_completion_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool)
                                       or not isinstance(max_tokens, int) or max_tokens < 1):
            raise BadRequest("'max_tokens' must be an integer >= 1")
        if max_tokens is not None and max_tokens > cap:
            raise BadRequest(f"'max_tokens' is {max_tokens}, over this model's cap of {cap}")
        sampling = SamplingParams(
            temperature=_number(params, "temperature", *SAMPLING_RANGES["temperature"],
                                self.defaults["temperature"]),
            top_k=_number(params, "top_k", *SAMPLING_RANGES["top_k"], self.defaults["top_k"],
                          integer=True),
            top_p=_number(params, "top_p", *SAMPLING_RANGES["top_p"], self.defaults["top_p"],
                          low_open=True),
            repetition_penalty=_number(params, "repetition_penalty",
                                       *SAMPLING_RANGES["repetition_penalty"],
                                       self.defaults["repetition_penalty"], low_open=True),
            seed=_number(params, "seed", 0, (1 << 63) - 1, None, integer=True),
        )
        stop = params.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        else:
            raise BadRequest("'stop' must be a string or a list of strings")
        if len(stop) > MAX_STOP or any(not s or len(s) > 256 for s in stop):
            raise BadRequest(f"'stop' takes at most {MAX_STOP} non-empty strings of up to 256 "
                             "characters")
        return GenerateRequest(prompt, max_tokens, sampling, stop)

    def generate(self, request: GenerateRequest, deadline: float | None = None
                 ) -> Iterator[dict]:
        """Stream one request: ``{"text": delta, "token": id}`` events, then one
        ``{"finish_reason", "prompt_tokens", "completion_tokens"}``. Everything a client can
        get wrong (and a full server: 429) raises here, before the first event."""
        started = time.monotonic()
        prompt = self.codec.encode(request.prompt)
        max_tokens = request.max_tokens
        if max_tokens is None:  # not asked for: the default, within what the context leaves
            room = self.engine.limits.max_context - len(prompt)
            max_tokens = max(1, min(self.default_max_tokens, room))
        seq = Sequence(prompt, max_tokens, request.sampling, self.eos_ids, deadline)
        attach_hops(seq, self.settings.version)  # the cuts it crosses, in its access-log line
        self.engine.submit(seq)
        events = self.engine.events(seq)
        try:
            first = next(events)  # admission: 429 raises here, before any byte is sent
        except BaseException:
            events.close()
            raise
        return self._stream(seq, first, events, request.stop, started)

    def _stream(self, seq: Sequence, first: tuple, events, stop: tuple[str, ...],
                started: float) -> Iterator[dict]:
        detok = Detokenizer(self.codec, stop)
        reason, last, ttft, gaps = "cancelled", None, None, []
        try:
            for kind, value in itertools.chain([first], events):
                if kind == "end":
                    reason = value
                    tail = detok.finish()
                    if tail:
                        yield {"text": tail, "token": None}
                    break
                now = time.monotonic()
                if last is None:
                    ttft = now - started
                else:
                    gaps.append(now - last)
                last = now
                text = detok.add(value)
                if text or not detok.stopped:
                    yield {"text": text, "token": value}
                if detok.stopped:
                    reason = "stop_sequence"
                    break
            yield {"finish_reason": reason, "prompt_tokens": len(seq.prompt),
                   "completion_tokens": len(seq.generated)}
        finally:
            events.close()  # cancels the sequence if it is still running
            queued = (seq.admitted_at or time.monotonic()) - seq.submitted
            observe_sequence(self.settings.model, str(self.settings.version), queued, ttft,
                             gaps, len(seq.prompt), len(seq.generated), reason)

    def complete(self, request: GenerateRequest, deadline: float | None = None) -> dict:
        """The whole answer at once: ``text``, ``finish_reason`` and token counts."""
        parts, end = [], {}
        for event in self.generate(request, deadline):
            if "finish_reason" in event:
                end = event
            else:
                parts.append(event["text"])
        return {"text": "".join(parts), **end}

    # the plain infer route: text_input -> text_output, default parameters --------------------

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        texts = np.asarray(inputs["text_input"]).reshape(-1)
        if texts.size != 1:
            raise BadRequest("text_input must hold exactly one string")
        value = texts[0]
        prompt = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        answer = self.complete(self.parse({}, prompt, set()))
        return {"text_output": np.array([answer["text"].encode("utf-8")], dtype=object)}

    def close(self) -> None:
        self.engine.close()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
