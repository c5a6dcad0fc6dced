"""Text in and out of a language model: the Rust ``tokenizers`` library, incremental
detokenization for streams, stop sequences, and chat templates in a sandboxed Jinja2.

A chat template comes with the model (``tokenizer_config.json``) and is untrusted input: it is
rendered in Jinja2's ``ImmutableSandboxedEnvironment`` (no attribute access to internals, no
mutation of the objects passed in), with a size cap on its output.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from runtime.errors import BadRequest, ModelLoadError

MAX_TEMPLATE_OUTPUT = 1_000_000  # characters a rendered chat prompt may have


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class TextCodec:
    """Encode prompts, decode tokens, render chat templates for one model version."""

    def __init__(self, read_bytes: Callable[[str], bytes], model: str, files: set[str]):
        from tokenizers import Tokenizer

        if "tokenizer.json" not in files:
            raise ModelLoadError(f"model {model!r}: a text-generation model needs tokenizer.json "
                                 "next to model.onnx")
        try:
            self.tokenizer = Tokenizer.from_str(read_bytes("tokenizer.json").decode("utf-8"))
        except Exception as exc:
            raise ModelLoadError(f"model {model!r}: tokenizer.json could not be read "
                                 f"({type(exc).__name__})") from None
        config: dict = {}
        if "tokenizer_config.json" in files:
            try:
                config = json.loads(read_bytes("tokenizer_config.json"))
            except ValueError:
                raise ModelLoadError(f"model {model!r}: tokenizer_config.json is not JSON"
                                     ) from None
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template = template if isinstance(template, str) else None
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tokenizer.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt for a chat, from the model's template (400 when it has none or fails)."""
        if self.chat_template is None:
            raise BadRequest("this model has no chat template: use /v1/completions")
        if self._compiled is None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            try:
                self._compiled = env.from_string(self.chat_template)
            except TemplateError:
                raise BadRequest("the model's chat template does not compile") from None
        parts, size = [], 0
        try:  # rendered piece by piece, so a runaway template stops at the cap, not at OOM
            for piece in self._compiled.generate(messages=messages, add_generation_prompt=True,
                                                 bos_token=self.bos_token or "",
                                                 eos_token=self.eos_token or ""):
                size += len(piece)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise BadRequest("the rendered chat prompt is too long")
                parts.append(piece)
        except BadRequest:
            raise
        except Exception as exc:  # SecurityError, TemplateError, type errors in the template
            raise BadRequest(f"the chat template could not render these messages "
                             f"({type(exc).__name__})") from None
        return "".join(parts)


def _raise_template_error(message: str) -> None:
    raise BadRequest(f"chat template: {str(message)[:200]}")


class Detokenizer:
    """Turn a growing list of token ids into text deltas, holding back bytes that do not yet
    form a whole character (byte-level BPE splits UTF-8 across tokens) and any tail that could
    still become a stop sequence."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...] = ()):
        self.codec = codec
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far, complete characters only
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False
        # Decode only a window: the tokens since the last complete text (``prefix``..``read``)
        # give the context a decoder needs (word boundaries), so each token costs O(1).
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        """The new text to emit after ``token`` (may be empty); sets ``stopped`` when a stop
        sequence appeared, in which case the text is cut just before it."""
        self.ids.append(token)
        before = self.codec.decode(self.ids[self.prefix:self.read])
        now = self.codec.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.text += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is still held back once generation ends."""
        if self.stopped:
            return ""
        before = self.codec.decode(self.ids[self.prefix:self.read])
        now = self.codec.decode(self.ids[self.prefix:])
        if len(now) > len(before):
            self.text += now[len(before):]
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.text
        if self.stop:
            cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop)
                       if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self.text = text = text[:cut]
                out, self.sent = text[self.sent:], len(text)
                return out
            if not final:  # hold back a tail that could be the start of a stop sequence
                hold = max((k for s in self.stop for k in range(1, len(s))
                            if text.endswith(s[:k])), default=0)
                end = len(text) - hold
                out = text[self.sent:end] if end > self.sent else ""
                self.sent = max(self.sent, end)
                return out
        out, self.sent = text[self.sent:], len(text)
        return out
