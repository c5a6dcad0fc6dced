"""Language models as a service: a plugin, not core (docs/generation.md).

It recognises a text-generation model among the versions the onnxruntime backend loads (its
graph signature, or ``task = "text-generation"`` in model.toml) and wraps it in a
:class:`~.model.GenerationModel`: tokenizer, KV cache, continuous batching, sampling. The
core only knows that a backend may stream (``Runtime.generate``); the OIP generate extension
and the OpenAI-compatible views (:mod:`.api`) sit on the shared route table. Nothing heavy is
imported until a text-generation model loads.
"""

from __future__ import annotations

from typing import Any

from runtime import hookimpl
from runtime.errors import ModelLoadError


@hookimpl(tryfirst=True)
def shardserve_wrap_backend(settings: Any, backend: Any) -> Any:
    task = settings.config.raw.get("task")
    if task == "decoder-stage":  # one stage of a decoder split by layers, KV cache kept here
        from .stage_server import StageBackend

        return StageBackend(settings, backend)
    names_in = [s.name for s in getattr(backend, "inputs", ())]
    if task is None and "input_ids" not in names_in:  # not a decoder: no import (cold starts)
        return None
    from .model import TASK, is_text_generation

    names_out = [s.name for s in getattr(backend, "outputs", ())]
    if task is None and not is_text_generation(names_in, names_out):
        return None
    if task not in (None, TASK):
        return None
    if not is_text_generation(names_in, names_out):
        raise ModelLoadError(f"model {settings.model!r}: task = {TASK!r} but the graph is not a "
                             "decoder with past key/values (export with "
                             "--task text-generation-with-past)")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"model {settings.model!r} generates text: install "
                             "shardserve[generate]") from None
    from .model import GenerationModel

    return GenerationModel(settings, backend)


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    from .command import add_generate_command

    add_generate_command(subparsers)
