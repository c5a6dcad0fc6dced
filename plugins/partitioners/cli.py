"""``shardserve partition`` and ``shardserve plan``.

Parsing happens here; the work (onnx, onnxruntime, matplotlib) is imported
only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plugins.sample_inputs import add_sample_arguments
from runtime.errors import BadRequest

STRATEGY_FLAGS = (
    # (flag, option key, help)
    ("--shards", "shards", "pipeline: number of shards K"),
    ("--device-factor", "device_factor", "pipeline: device speed factor (x slower)"),
    ("--bandwidth", "bandwidth", "link bandwidth, e.g. 10Mbps"),
    ("--rtt", "rtt", "link round-trip time, e.g. 20ms"),
    ("--edge-factor", "edge_factor", "edge-cloud: edge device factor (default 4)"),
    ("--cloud-factor", "cloud_factor", "edge-cloud: cloud device factor (default 1)"),
    ("--objective", "objective", "edge-cloud: latency (default) or gb-seconds"),
    ("--slo", "slo", "edge-cloud: latency SLO for gb-seconds, e.g. 150ms"),
    ("--memory-gb", "memory_gb", "edge-cloud: cloud function memory in GB (default 1)"),
    ("--edge-placement", "edge_placement", "edge-cloud: placement of the edge shard"),
    ("--cloud-placement", "cloud_placement", "edge-cloud: placement of the cloud shard"),
    ("--memory-budget", "memory_budget", "memory: per-shard memory budget, e.g. 512MB"),
    ("--max-shard-bytes", "max_shard_bytes", "memory: per-shard weight (package) limit"),
    ("--replicas", "replicas", "batch: number of data-parallel replicas"),
    ("--placement", "placement", "batch: placement of every replica"),
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name in the repository")
    p.add_argument("--repository", "-r", help="model repository directory")
    p.add_argument("--strategy", "-s", required=True,
                   help="pipeline, edge-cloud, memory, batch or a plugin's")
    p.add_argument("--model-version", type=int,
                   help="version to cut (default: newest unpartitioned)")
    p.add_argument("--cost", choices=("static", "measured"), default="static",
                   help="cost model (default static)")
    p.add_argument("--runs", type=int, default=20, help="profiling runs for --cost measured")
    p.add_argument("--batch-size", type=int, default=1, help="input batch the costs assume")
    add_sample_arguments(p)
    for flag, key, text in STRATEGY_FLAGS:
        p.add_argument(flag, dest=f"opt_{key}", help=text)
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy option (repeatable), for plugin strategies")
    p.add_argument("--private", action="store_true",
                   help="edge-cloud, language models: keep the embedding, the first layers "
                        "and the LM head on the edge, so no token id leaves it "
                        "(same as -o private=true)")
    p.add_argument("--links", metavar="registry:NODE,PEER",
                   help="bandwidth and RTT as NODE measured them to PEER (a node or a pool), "
                        "from the registry (docs/registry.md)")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("partition", help="cut a model into shards: writes a new version",
                              allow_abbrev=False)
    _common(p)
    p.add_argument("--backend", default="onnxruntime", help="backend of every shard")
    p.add_argument("--target-version", type=int, help="version number to write (default: next)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the plan against the original before publishing")
    p.set_defaults(func=cmd_partition)

    p = subparsers.add_parser("plan", help="print a strategy's candidate cuts and chosen shards",
                              allow_abbrev=False)
    _common(p)
    p.add_argument("--plot", metavar="FILE.png", help="draw latency and bytes per cut")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)


def _options(args: argparse.Namespace) -> dict:
    options = {key: getattr(args, f"opt_{key}") for _, key, _ in STRATEGY_FLAGS
               if getattr(args, f"opt_{key}", None) is not None}
    for text in args.option:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise BadRequest(f"--option expects KEY=VALUE, got {text!r}")
        options[key.replace("-", "_")] = value
    if getattr(args, "private", False):
        options["private"] = "true"
    if getattr(args, "links", None):
        if "bandwidth" in options or "rtt" in options:
            raise BadRequest("--links and --bandwidth/--rtt exclude each other")
        from plugins.registry.links import registry_link

        options["bandwidth"], options["rtt"] = registry_link(args.config, args.links)
    return options


def _not_private(options: dict) -> dict:
    """The options of a model that is not a language model: a private split has no meaning."""
    from plugins.generation.split_plan import is_private

    if is_private(options):
        raise BadRequest("--private splits a text-generation model (tokenizer.json beside its "
                         "model.onnx) so that no token id leaves the edge; this model is not one")
    return options


def _repository(args: argparse.Namespace) -> Path:
    if args.repository:
        return Path(args.repository).resolve()
    from runtime.config import load_config

    return Path(load_config(args.config).repository)


def _runtime(args: argparse.Namespace):
    """The command's Runtime: its plugin manager decides which strategies exist."""
    from runtime import Runtime

    return Runtime.from_config(args.config, overrides={"repository": {
        "load": "none", "path": str(_repository(args))}})


def _analyse(args: argparse.Namespace):
    from plugins.sample_inputs import sample_options

    from .build import analyse

    return analyse(_repository(args), args.model, args.model_version, args.batch_size, args.cost,
                   args.runs, progress=sys.stderr.isatty(),
                   sample=sample_options(args.sample, args.input_shape))


def cmd_partition(args: argparse.Namespace) -> int:
    from plugins.generation.split_plan import decoder_source, partition_decoder

    from .build import plan_partition, write_partition

    source = decoder_source(_repository(args), args.model, args.model_version)
    if source is not None:  # a text-generation export: cut between layers (docs/partitioning)
        target = partition_decoder(source, args.strategy, _options(args),
                                   args.target_version, verify=not args.no_verify)
        print(f"wrote {args.model} version {target.name} (decoder split by layers)")
        return 0
    options, rt = _not_private(_options(args)), _runtime(args)
    analysis = _analyse(args)
    part = plan_partition(analysis, args.strategy, options, runtime=rt)
    target = write_partition(analysis, args.strategy, options, part, _repository(args),
                             backend=args.backend, target_version=args.target_version,
                             verify=not args.no_verify, progress=sys.stderr.isatty(),
                             runtime=rt)
    print(f"wrote {args.model} version {target.name} ({len(part.groups)} shard(s), "
          f"strategy {args.strategy}, predicted latency "
          f"{part.predicted.get('latency_s', 0) * 1e3:.3f} ms)")
    _print_shards(analysis, part, args.backend)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from plugins.generation.split_plan import decoder_source, format_decoder_plan, plan_decoder

    from .build import plan_partition

    source = decoder_source(_repository(args), args.model, args.model_version)
    if source is not None:  # a text-generation export: cuts between layers (docs/partitioning)
        plan = plan_decoder(source, args.strategy, _options(args))
        print(json.dumps(plan, indent=2) if args.json else format_decoder_plan(plan))
        return 0
    options, rt = _not_private(_options(args)), _runtime(args)
    analysis = _analyse(args)
    part = plan_partition(analysis, args.strategy, options, runtime=rt)
    if args.json:
        print(json.dumps({"predicted": part.predicted, "groups": part.groups,
                          "placements": part.placements, "shard_costs": part.shard_costs,
                          "candidates": part.candidates}, indent=2, default=str))
    else:
        nodes = sum(len(u.nodes) for u in analysis.graph.units)
        print(f"{args.model} version {analysis.version}: {len(analysis.graph)} units "
              f"({nodes} computing nodes), "
              f"{analysis.costs.kind} costs at batch {analysis.costs.batch}, "
              f"strategy {args.strategy}")
        print(f"\n{'CUT':>4}  {'AFTER UNIT':<44} {'BYTES AT CUT':>13} {'LATENCY ms':>11}")
        for row in part.candidates:
            print(f"{row['cut']:>4}  {str(row['after'])[:44]:<44} {row['bytes']:>13,} "
                  f"{row['latency_s'] * 1e3:>11.4f}")
        print("\npredicted: " + ", ".join(f"{k}={_fmt(v)}" for k, v in part.predicted.items()))
        _print_shards(analysis, part, "onnxruntime")
    if args.plot:
        plot_candidates(part.candidates, Path(args.plot), f"{args.model}: {args.strategy}")
        print(f"plot written to {args.plot}")
    return 0


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _print_shards(analysis, part, backend: str) -> None:
    graph = analysis.graph
    print(f"\n{'SHARD':<8} {'UNITS':>5} {'PREDICTED ms':>13} {'WEIGHTS':>11} {'SENDS':>11} "
          f"{'BACKEND':<12} PLACEMENT")
    for i, group in enumerate(part.groups):
        cost = part.shard_costs[i] if i < len(part.shard_costs) else {}
        print(f"{i:<8} {len(group):>5} {cost.get('predicted_s', 0) * 1e3:>13.4f} "
              f"{graph.weights_of(group):>11,} {cost.get('send_bytes', 0):>11,} {backend:<12} "
              f"{part.placements[i]}")


def plot_candidates(rows: list[dict], path: Path, title: str) -> None:
    """Latency versus cut position, and bytes per cut, in one PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = [r["cut"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(cuts, [r["latency_s"] * 1e3 for r in rows], marker="o")
    top.set_ylabel("predicted latency (ms)")
    top.set_title(title)
    bottom.bar(cuts, [r["bytes"] / 1024 for r in rows])
    bottom.set_ylabel("bytes at cut (KiB)")
    bottom.set_xlabel("cut position in topological order")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
