"""``shardserve optimize`` and ``shardserve optimizers``."""

from __future__ import annotations

import argparse
from typing import Any


def _runtime(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from runtime import Runtime

    overrides: dict = {"repository": {"load": "none"}}
    if getattr(args, "repository", None):
        overrides["repository"]["path"] = str(Path(args.repository).resolve())
    return Runtime.from_config(args.config, overrides=overrides)


def cmd_optimize(args: argparse.Namespace) -> int:
    from .pipeline import (
        Settings,
        chain_from_config,
        optimizer_registry,
        parse_step,
        run_chain,
        split_chain,
    )

    rt = _runtime(args)
    registry = optimizer_registry(rt.pm)
    steps = [parse_step(registry, spec) for value in args.with_
             for spec in split_chain(value, registry.names())]
    if not steps:
        steps = chain_from_config(registry, rt.repository.config(args.model).raw)
    budget = {key: getattr(args, key) for key in ("max_abs_diff", "min_cosine", "min_top1")
              if getattr(args, key) is not None}
    settings = Settings(
        source_version=args.source_version, calibration_dir=args.calibration,
        samples=args.samples, batch=args.batch, seed=args.seed, budget=budget,
        latency_runs=args.latency_runs, latency_batch=args.latency_batch,
        threads=args.threads, level=args.measure_level, dry_run=args.dry_run,
        sample=args.sample, input_shape=args.input_shape,
    )
    run_chain(rt.repository.root, args.model, steps, settings, runtime=rt)
    return 0


def cmd_optimizers(args: argparse.Namespace) -> int:
    from .pipeline import optimizer_registry

    registry = optimizer_registry(_runtime(args).pm)
    for name in registry.names():
        optimizer = registry[name]
        print(f"{name}: {optimizer.summary} [{registry.sources[name]}]")
        for option in optimizer.options:
            print(f"    {option.describe()}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def add_commands(subparsers: Any) -> None:
    from plugins.sample_inputs import add_sample_arguments

    p = subparsers.add_parser(
        "optimize", help="optimise a model into a new version, with an accuracy report",
        allow_abbrev=False,
        description="Apply optimizers to a model version and publish the result as a new "
        "version, if it keeps the accuracy budget. See docs/optimizing.md.",
    )
    p.add_argument("model")
    p.add_argument("--repository", "-r", help="model repository directory")
    p.add_argument("--with", dest="with_", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="an optimizer and its options; repeat for a chain "
                   "(default: optimize = [...] in the model's model.toml)")
    p.add_argument("--source-version", type=_positive,
                   help="version to optimise (default: newest one not made by optimize)")
    p.add_argument("--calibration", metavar="DIR", help="directory of <input>.npy files")
    add_sample_arguments(p)
    p.add_argument("--samples", type=_positive, default=64, help="generated samples (64)")
    p.add_argument("--batch", type=_positive, default=8, help="calibration batch size (8)")
    p.add_argument("--seed", type=int, default=0, help="seed of generated inputs (0)")
    p.add_argument("--max-abs-diff", type=float, help="budget: largest allowed abs difference")
    p.add_argument("--min-cosine", type=float, help="budget: smallest mean cosine similarity")
    p.add_argument("--min-top1", type=float, help="budget: smallest top-1 agreement (0..1)")
    p.add_argument("--latency-runs", type=int, default=50, help="timed runs per model (50)")
    p.add_argument("--latency-batch", type=_positive, default=1, help="batch when timing (1)")
    p.add_argument("--threads", type=_positive, default=1, help="onnxruntime threads (1)")
    p.add_argument("--measure-level", default="all",
                   choices=("disable", "basic", "extended", "all"),
                   help="onnxruntime graph optimisation of the measuring sessions (all)")
    p.add_argument("--dry-run", action="store_true", help="report only, publish nothing")
    p.set_defaults(func=cmd_optimize)

    p = subparsers.add_parser("optimizers", help="list the registered optimizers and options",
                              allow_abbrev=False)
    p.set_defaults(func=cmd_optimizers)
