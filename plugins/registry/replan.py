"""Re-planning an edge-cloud model when its measured link changes (``shardserve replan``).

Runs beside a serving node (it needs the build extra: onnx for the analysis; the serving
path stays without it). Every ``every_s`` it reads the link the node published for its
peer (``--links registry:NODE,PEER``), prices the deployed cut and the best cut under
that link with the edge-cloud planner's own model, and writes a new plan version when
the predicted gain ``(deployed - best) / deployed`` passes ``threshold`` on ``confirm``
consecutive checks (hysteresis: a link that flickers does not flip the plan) and the last
re-plan is at least ``min_interval_s`` old (rate limit). Every decision is logged with
its reason; a server with the ``latest`` version policy serves the new version once its
repository is reloaded (``POST /v2/repository/models/{m}/load``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugins.links import Link
from runtime.errors import BadRequest

log = logging.getLogger("shardserve.registry")


@dataclass
class Replanner:
    analysis: Any  # plugins.partitioners.build.Analysis of the plan's source version
    options: dict  # the deployed plan's [options]
    threshold: float = 0.2
    confirm: int = 3
    min_interval_s: float = 60.0
    streak: int = 0
    last_replan: float | None = None
    history: list[dict] = field(default_factory=list)

    def _edge(self, options: dict) -> tuple[Any, set[int]]:
        from plugins.partitioners.edge_cloud import EdgeCloudPartitioner

        return EdgeCloudPartitioner().choose(self.analysis.graph, self.analysis.costs, options)

    def check(self, link: Link, now: float | None = None) -> dict:
        """One decision under ``link``; ``replan`` True means: write the plan for ``options``."""
        now = time.monotonic() if now is None else now
        _, deployed = self._edge(self.options)
        options = {**self.options, "bandwidth": link.bandwidth_bps, "rtt": link.rtt_s}
        model, best = self._edge(options)
        current_s, best_s = model.latency(deployed), model.latency(best)
        gain = (current_s - best_s) / current_s if current_s > 0 else 0.0
        self.streak = self.streak + 1 if gain > self.threshold else 0
        decision = {"bandwidth_bps": link.bandwidth_bps, "rtt_s": link.rtt_s,
                    "deployed_s": current_s, "best_s": best_s, "gain": round(gain, 4),
                    "replan": False, "options": options}
        if gain <= self.threshold:
            decision["why"] = f"gain {gain:.1%} within the {self.threshold:.0%} threshold"
        elif self.streak < self.confirm:
            decision["why"] = f"gain {gain:.1%}: seen {self.streak} of {self.confirm} times"
        elif self.last_replan is not None and now - self.last_replan < self.min_interval_s:
            decision["why"] = (f"gain {gain:.1%}, but the last re-plan was "
                               f"{now - self.last_replan:.0f} s ago (< {self.min_interval_s} s)")
        else:
            decision.update(replan=True, why=f"gain {gain:.1%} over the {self.threshold:.0%} "
                                             f"threshold {self.streak} times in a row")
            self.options, self.streak, self.last_replan = options, 0, now
        self.history.append(decision)
        return decision


def deployed_plan(repository: Path, model: str) -> tuple[int, dict]:
    """(source version, [options]) of the newest edge-cloud plan version of ``model``."""
    from runtime.config import toml_module

    tomllib = toml_module()

    versions = sorted((int(p.name) for p in (repository / model).iterdir()
                       if p.is_dir() and p.name.isdigit()), reverse=True) \
        if (repository / model).is_dir() else []
    for version in versions:
        plan = repository / model / str(version) / "plan.toml"
        if plan.is_file():
            raw = tomllib.loads(plan.read_text())
            if raw.get("strategy") == "edge-cloud":
                return int(raw.get("source_version", 1)), dict(raw.get("options", {}))
    raise BadRequest(f"model {model!r} has no edge-cloud plan version to re-plan")


def cmd_replan(args: Any) -> int:
    from plugins.partitioners.build import analyse, plan_partition, write_partition
    from runtime.config import load_config

    from .links import registry_link

    repository = Path(args.repository or load_config(args.config).repository)
    source, options = deployed_plan(repository, args.model)
    replanner = Replanner(analyse(repository, args.model, source, cost=args.cost), options,
                          args.threshold, args.confirm, args.min_interval_s)
    while True:
        try:
            bandwidth, rtt = registry_link(args.config, args.links)
        except BadRequest as exc:
            log.warning("replan %s: %s", args.model, exc.message)
        else:
            decision = replanner.check(Link(bandwidth, rtt))
            if decision["replan"]:
                part = plan_partition(replanner.analysis, "edge-cloud", decision["options"])
                target = write_partition(replanner.analysis, "edge-cloud", decision["options"],
                                         part, repository, verify=not args.no_verify)
                decision["version"] = int(target.name)
            log.info("replan %s: %s", args.model, decision["why"])
            print(json.dumps({k: v for k, v in decision.items() if k != "options"}),
                  flush=True)
        if args.once:
            return 0
        time.sleep(args.every_s)


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("replan", help="re-plan an edge-cloud model when its measured "
                                             "link changes (docs/registry.md)")
    p.add_argument("model")
    p.add_argument("--repository", "-r", help="model repository (default: the config's)")
    p.add_argument("--links", required=True, metavar="registry:NODE,PEER")
    p.add_argument("--threshold", type=float, default=0.2, help="relative gain (0.2)")
    p.add_argument("--confirm", type=int, default=3, help="consecutive checks (3)")
    p.add_argument("--min-interval-s", type=float, default=60.0, help="between re-plans (60)")
    p.add_argument("--every-s", type=float, default=10.0, help="between checks (10)")
    p.add_argument("--cost", choices=("static", "measured"), default="static",
                   help="per-node costs, as `shardserve partition --cost` (static)")
    p.add_argument("--once", action="store_true", help="one check, then exit")
    p.add_argument("--no-verify", action="store_true", help="skip verifying the new plan")
    p.set_defaults(func=cmd_replan)
