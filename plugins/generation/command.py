"""``shardserve generate``: try a language model from the shell, in process, streamed to stdout.

    shardserve generate MODEL "def main(" -r examples/models --max-tokens 60 --temperature 0.7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_generate_command(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text with a language model in process")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--repository", "-r", help="model repository directory")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runtime import Runtime
    from runtime.errors import ShardserveError

    overrides: dict = {"repository": {"load": [args.model]}, "metrics": {"enabled": False}}
    if args.repository:
        overrides["repository"]["path"] = str(Path(args.repository).resolve())
    params = {key: value for key, value in (
        ("max_tokens", args.max_tokens), ("temperature", args.temperature),
        ("top_k", args.top_k), ("top_p", args.top_p),
        ("repetition_penalty", args.repetition_penalty), ("seed", args.seed),
        ("stop", args.stop)) if value is not None}
    try:
        rt = Runtime.from_config(None, overrides=overrides).start()
        backend = rt.get_model(args.model).backend
        if not hasattr(backend, "parse"):
            raise SystemExit(f"model {args.model!r} does not generate text")
        request = backend.parse(params, args.prompt, set(params))
        end: dict = {}
        for event in rt.generate(args.model, request):
            if "finish_reason" in event:
                end = event
            else:
                sys.stdout.write(event["text"])
                sys.stdout.flush()
    except ShardserveError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    sys.stdout.write("\n")
    print(f"[{end.get('finish_reason')}: {end.get('prompt_tokens')} prompt tokens, "
          f"{end.get('completion_tokens')} generated]", file=sys.stderr)
    return 0
