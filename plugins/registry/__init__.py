"""Service registration and discovery (docs/registry.md).

Two registry stores with one contract: ``embedded`` (SQLite in the state directory, one
host) and ``etcd`` (leases through etcd's JSON gateway). A node serving with ``[registry]
enabled`` registers itself and heartbeats; a plan placement ``pool:NAME`` resolves through
the registry to healthy replicas (the ``pool`` executor); ``shardserve nodes`` and ``GET
/v2/shardserve/registry`` show the nodes and their states. The ``pool`` executor is
registered by ``plugins.executors`` (off with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime import hookimpl

if TYPE_CHECKING:  # the CLI's alone: serving (and a Lambda cold start) never imports it
    import argparse


def embedded_store(config: Any, settings: Any) -> Any:
    from .settings import embedded_path
    from .stores import EmbeddedRegistry

    return EmbeddedRegistry(embedded_path(config))


def etcd_store(config: Any, settings: Any) -> Any:
    from .stores import EtcdRegistry

    return EtcdRegistry(list(settings.etcd_endpoints), settings.prefix)


@hookimpl(trylast=True)
def shardserve_register_registries(register: Any) -> None:
    register("embedded", embedded_store)
    register("etcd", etcd_store)


@hookimpl
def shardserve_startup(runtime: Any) -> None:
    if not runtime.config.section("registry"):
        return  # nothing to check, and nothing more imported on a cold start
    from .settings import registry_settings

    registry_settings(runtime.config)  # a bad [registry] fails at startup


def cmd_nodes(args: argparse.Namespace) -> int:
    """Read the configured store once and print its nodes."""
    import json

    from runtime.config import load_config

    from .directory import Directory
    from .settings import open_store, registry_settings

    config = load_config(getattr(args, "config", None))
    settings = registry_settings(config)
    directory = Directory(open_store(config, settings), settings.ttl_s, settings.refresh_s)
    directory.refresh()
    view = {"store": settings.store, **directory.view()}
    if directory.read_at is None:
        view["error"] = "the registry store cannot be reached"
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print(f"{'NODE':24} {'STATE':9} {'URL':28} {'POOLS':12} {'REQ/S':>7} "
              f"{'LAT_MS':>7} {'QUEUE':>6} MODELS")
        for node in view["nodes"]:
            models = ",".join(f"{m['name']}/{m['version']}" for m in node["models"])
            load = node.get("load") or {}
            figures = [_figure(load.get(k)) for k in ("requests_per_s", "latency_ms",
                                                       "queue_depth")]
            print(f"{node['id']:24} {node['state']:9} {node['url'] or '-':28} "
                  f"{','.join(node['pools']):12} {figures[0]:>7} {figures[1]:>7} "
                  f"{figures[2]:>6} {models or '-'}")
        if "error" in view:
            print(view["error"])
    return 1 if "error" in view else 0


def _figure(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("nodes", help="list registered nodes, their state and shards")
    p.add_argument("--json", action="store_true", help="the view as JSON")
    p.set_defaults(func=cmd_nodes)
    from .replan import add_command

    add_command(subparsers)
