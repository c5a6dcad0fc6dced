"""Serving shards remotely: ``shardserve shards export`` and the ``wire`` backend.

``shardserve shards export MODEL --version V --to REPO`` writes each shard of a plan
version as its own model ``<MODEL>.<shard>`` (version 1) in another repository, so a
remote node serves it like any model and a remote shard is a plain V2 ``infer`` call.
With ``--wire``, the exported models use the ``wire`` backend: every input and output is
one BYTES element holding a wire blob (plugins/executors/base.py) that went through the
``[executors] transforms`` chain (compress, encrypt); both ends configure the same chain.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plugins.shard_plan import PLAN_FILE, parse_plan
from runtime import TensorSpec, current_call
from runtime.errors import BadRequest, ModelLoadError
from runtime.repository import ModelRepository, validate_model_name

from .base import TransformChain, decode_blob, encode_blob

if TYPE_CHECKING:
    import argparse


def export_shards(repository: Path, model: str, version: int | None, target: Path,
                  wire: bool = False) -> list[str]:
    """Write every shard of a plan version as its own model under ``target``; returns names."""
    repo = ModelRepository(repository)
    versions = [v for v in repo.versions(model)
                if (repo.version_dir(model, v) / PLAN_FILE).is_file()]
    if version is None and versions:
        version = max(versions)
    if version not in versions:
        raise BadRequest(f"model {model!r} has no partitioned version {version}")
    source = repo.version_dir(model, version)
    plan = parse_plan(model, (source / PLAN_FILE).read_bytes())
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for shard in plan.shards:
        name = validate_model_name(f"{model}.{shard.name}")
        import tempfile  # not at import: cold starts
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target))
        try:
            (staging / "1").mkdir()
            for file in source.iterdir():  # the shard and its external data files
                if file.name == shard.file or file.name.startswith(shard.file + "."):
                    shutil.copyfile(file, staging / "1" / ("model.onnx" + file.name[
                        len(shard.file):]))
            lines = [f'backend = "{"wire" if wire else shard.backend}"', "max_batch_size = 0"]
            if wire:
                lines += ["", "[wire]", f'inner = "{shard.backend}"']
            options = {k: v for k, v in shard.options.items()
                       if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
            if options:
                lines += ["", f"[{shard.backend}]"]
                lines += [f"{k} = {v!r}".replace("'", '"') for k, v in options.items()]
            (staging / "model.toml").write_text("\n".join(lines) + "\n")
            _swap_in(staging, target / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        names.append(name)
    return names


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` with ``staging`` so readers never see a half-written model."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


class WireBackend:
    """Serves an exported shard whose tensors travel as transformed wire blobs."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.inner = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    def load(self) -> None:
        s = self.settings
        section = s.config.raw.get("wire", {})
        inner = section.get("inner", "onnxruntime") if isinstance(section, dict) else None
        if not isinstance(inner, str) or inner == "wire" or s.backends is None \
                or inner not in s.backends:
            raise ModelLoadError(f"model {s.model!r}: [wire] inner must name a backend")
        names = s.server.section("executors").get("transforms", []) if s.server else []
        self.chain = TransformChain(names, s.plugins, s.server)
        options = s.config.raw.get(inner, {})
        self.inner = s.backends[inner](s.replace(
            options=options if isinstance(options, dict) else {}))
        self.inner.load()
        self.inputs = [TensorSpec(t.name, "BYTES", [1]) for t in self.inner.inputs]
        self.outputs = [TensorSpec(t.name, "BYTES", [1]) for t in self.inner.outputs]
        self.platform = getattr(self.inner, "platform", "wire")

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        import numpy as np

        call = current_call()
        ctx = {"request_id": call.request_id if call else "no-request",
               "shard": self.settings.model}
        feed = {name: decode_blob(value.reshape(-1)[0], self.chain, {**ctx, "tensor": name})
                for name, value in inputs.items()}
        result = self.inner.run(feed, outputs)
        return {name: np.array([encode_blob(value, self.chain, {**ctx, "tensor": name})],
                               dtype=object) for name, value in result.items()}

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("shards", help="serve a plan's shards on other nodes")
    sub = p.add_subparsers(dest="shards_command", required=True)
    e = sub.add_parser("export", help="write each shard as its own model <model>.<shard>")
    e.add_argument("model")
    e.add_argument("--version", type=int, help="plan version (default: the newest plan)")
    e.add_argument("--repository", "-r", help="source repository (default: the config's)")
    e.add_argument("--to", required=True, help="target repository directory")
    e.add_argument("--wire", action="store_true",
                   help="tensors as transformed wire blobs ([executors] transforms)")
    e.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.repository:
        repository = Path(args.repository)
    else:
        from runtime.config import load_config

        repository = Path(load_config(getattr(args, "config", None)).repository)
    for name in export_shards(repository, args.model, args.version, Path(args.to), args.wire):
        print(name)
    return 0
