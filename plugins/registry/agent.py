"""Registration: a serving node announces itself and heartbeats until it stops.

One thread in the serving process (gunicorn's master, or the dev server's process), so a
node killed with SIGKILL stops heartbeating at once and its lease expires. Every
``ttl_s / 3`` it sends its record to ``[registry] endpoint`` (its own server by default) as
an authenticated ``PUT``; on a clean stop it sends ``DELETE``. A failed heartbeat is logged
once and retried on the next beat (the store may be down: the node keeps serving).

The record: id, URL, pools, capabilities, the model versions this server has actually
loaded (read from its own metrics, every worker's: ``shardserve_inference_model_loaded``)
with the sha256 of each model file and plan shard, and its load over the last heartbeat
interval from the request and queue histograms: requests/s, mean latency, and the mean
number of requests in the server and waiting in batching queues (Little's law: summed
time / interval).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from plugins.atomic_files import file_sha256
from runtime.errors import ShardserveError

from .links import LinkTable, probe
from .settings import RegistrySettings, registry_settings

log = logging.getLogger("shardserve.registry")

MODEL_FILES = ("model.onnx", "plan.toml")
CHECK_S = 1.0  # how often the models served are compared with the last heartbeat's
LOADED = "shardserve_inference_model_loaded"
REQUESTS = "shardserve_inference_request_duration_us"
QUEUED = "shardserve_inference_queue_duration_us"

_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def _digest(path: Path) -> str:
    """The file's sha256, computed again only when its size or mtime changed."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    found = _digests.get(key)
    if found is None:
        if len(_digests) > 4096:
            _digests.clear()
        found = _digests[key] = file_sha256(path)  # streamed: models can be GBs
    return found


def _plan_shards(plan: Path) -> list[dict]:
    """``{name, sha256}`` of each shard file a plan version names (remote ones have none)."""
    from runtime.config import toml_module

    tomllib = toml_module()

    try:
        shards = tomllib.loads(plan.read_text()).get("shards", [])
    except (OSError, ValueError):
        return []
    out = []
    for shard in shards if isinstance(shards, list) else []:
        file = shard.get("file") if isinstance(shard, dict) else None
        if isinstance(file, str) and (plan.parent / file).is_file() and \
                plan.parent.resolve() in (plan.parent / file).resolve().parents:
            out.append({"name": str(shard.get("name", file)),
                        "sha256": _digest(plan.parent / file)})
    return out


def repository_models(repository: Path) -> list[dict]:
    """``{name, version, sha256}`` of each version directory holding a model or plan file
    (a plan's with ``shards``: the sha256 of each shard file)."""
    found = []
    if not repository.is_dir():
        return found
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        for version in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            for name in MODEL_FILES:
                path = version / name
                if path.is_file():
                    entry = {"name": model_dir.name, "version": version.name,
                             "sha256": _digest(path)}
                    if name == "plan.toml":
                        entry["shards"] = _plan_shards(path)
                    found.append(entry)
                    break
    return found


def served_metrics(full: bool = True) -> tuple[set[tuple[str, str]], dict[str, float]]:
    """(loaded (model, version) pairs, request totals) from this server's metrics: every
    gunicorn worker's (the multiprocess directory) or this process's (the dev server).
    ``full=False`` (the per-second check): only the loaded-models gauge is read (the live
    gauge files, not every worker's histograms); the totals come back zero."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = _metric_files(Path(folder))
        if not full:
            files = [f for f in files if Path(f).name.startswith("gauge_live")]
        families = MultiProcessCollector.merge(files, accumulate=True)
    else:
        from prometheus_client import REGISTRY

        families = REGISTRY.collect() if full else \
            REGISTRY.restricted_registry([LOADED]).collect()
    loaded: set[tuple[str, str]] = set()
    totals = {"count": 0.0, "sum_us": 0.0, "queue_us": 0.0}
    fields = {f"{REQUESTS}_count": "count", f"{REQUESTS}_sum": "sum_us",
              f"{QUEUED}_sum": "queue_us"}
    for family in families:
        for sample in family.samples:
            if sample.name == LOADED:
                if sample.value > 0:
                    loaded.add((sample.labels.get("model", ""), sample.labels.get("version", "")))
            elif sample.name in fields:
                totals[fields[sample.name]] += sample.value
    return loaded, totals


def _metric_files(folder: Path) -> list[str]:
    """The multiprocess files to merge: every histogram (a dead worker's requests still
    count), but a "live" gauge only from processes alive now (a process that exited
    without being marked dead, such as the child that checks the models before the
    workers start, must not keep a version loaded)."""
    out = []
    for path in folder.glob("*.db"):
        if path.name.startswith("gauge_live"):
            try:
                os.kill(int(path.stem.rsplit("_", 1)[1]), 0)
            except (ValueError, ProcessLookupError):
                continue
            except PermissionError:  # alive, another user's
                pass
        out.append(str(path))
    return out


class LoadMeter:
    """The load over the interval between two heartbeats, from cumulative totals."""

    def __init__(self) -> None:
        self._last: tuple[float, dict] | None = None

    def sample(self, totals: dict[str, float], now: float) -> dict:
        last, self._last = self._last, (now, dict(totals))
        if last is None or now <= last[0]:
            return {}
        span = now - last[0]
        change = {k: totals[k] - last[1].get(k, 0.0) for k in totals}
        if min(change.values()) < 0:  # counters reset (a restart): no figure this time
            return {}
        count = change["count"]
        return {"requests_per_s": round(count / span, 3),
                "latency_ms": round(change["sum_us"] / count / 1000, 3) if count else None,
                "in_flight": round(change["sum_us"] / 1e6 / span, 3),
                "queue_depth": round(change["queue_us"] / 1e6 / span, 3)}


def capabilities() -> dict:
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return {"numba": importlib.util.find_spec("numba") is not None,
            "memory_bytes": pages * size, "cpus": os.cpu_count() or 1}


class RegistrationAgent:
    """Registers one node and keeps its lease alive (``start()`` / ``stop()``)."""

    def __init__(self, settings: RegistrySettings, repository: Path, url: str, node_id: str,
                 config: Any = None):
        self.settings, self.config = settings, config
        self.repository = repository
        self.url = url.rstrip("/")
        self.node_id = node_id
        self.endpoint = (settings.endpoint or self.url).rstrip("/")
        self.path = f"/v2/shardserve/registry/nodes/{node_id}"
        self.metrics = config is None or \
            config.section("metrics").get("enabled", True) is not False
        self.lazy = getattr(config, "load", "all") == "lazy"
        self.models = repository_models(repository)  # a bad repository fails at startup
        self.capabilities = capabilities()
        self.last_status: int | None = None
        self.latency_ms: float | None = None
        self.meter = LoadMeter()
        # every call: under the lease, and short enough that a stop never waits long (a
        # node stopping may be calling its own server, which no longer answers)
        self.timeout_s = min(settings.ttl_s / 2, 5.0)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._send_lock = threading.Lock()  # a PUT never follows stop()'s DELETE
        self._pid = os.getpid()  # the process whose agent this is (start() sets it)
        self.links = LinkTable()

    def _headers(self, method: str, body: bytes, path: str | None = None) -> dict:
        from plugins.security.settings import read_key_material

        headers = {"Content-Type": "application/json"}
        s = self.settings
        if s.hmac_client and s.hmac_secret_env:
            from plugins.security.hmac_signing import sign_request

            secret = read_key_material("[registry] hmac_secret_env", s.hmac_secret_env)
            headers.update(sign_request(secret, s.hmac_client, method, path or self.path,
                                        body))
        elif s.token_env:
            headers["Authorization"] = f"Bearer {os.environ.get(s.token_env, '')}"
        return headers

    def _send(self, method: str, body: bytes = b"") -> int:
        request = urllib.request.Request(self.endpoint + self.path, data=body or None,
                                         method=method, headers=self._headers(method, body))
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = 0  # the endpoint is not reachable
        self.latency_ms = round((time.perf_counter() - start) * 1000, 3)
        if status != self.last_status and status not in (200, 0):
            log.warning("registration of node %s answered %s", self.node_id, status)
        elif status == 0 and self.last_status != 0:
            log.warning("registration endpoint of node %s unreachable", self.node_id)
        self.last_status = status
        return status

    def served(self, full: bool = True) -> tuple[list[dict], dict | None]:
        """(models, request totals or None) now. The models are the versions loaded now (on
        a ``lazy`` server also those not loaded yet, with ``loaded: false``: the first
        request loads them); with metrics off, the repository's versions (``loaded: null``).
        """
        listing = repository_models(self.repository)
        if not self.metrics:
            return [{**m, "loaded": None} for m in listing], None
        try:
            loaded, totals = served_metrics(full)
        except Exception as exc:  # noqa: BLE001 - a worker's file half written: next time
            log.debug("registry: metrics unreadable (%s)", type(exc).__name__)
            return [{**m, "loaded": None} for m in listing], None
        models = [{**m, "loaded": (m["name"], m["version"]) in loaded} for m in listing]
        return [m for m in models if m["loaded"] or self.lazy], totals if full else None

    def beat(self, served: tuple[list[dict], dict | None] | None = None) -> int:
        self.models, totals = served or self.served()
        load: dict = {"heartbeat_latency_ms": self.latency_ms}
        if totals is not None:
            load.update(self.meter.sample(totals, time.monotonic()))
        record = {"url": self.url, "pools": list(self.settings.pools), "models": self.models,
                  "capabilities": self.capabilities, "load": load,
                  "links": dict(self.links.links)}
        with self._send_lock:
            if self._stop.is_set():
                return 0  # stopping: the DELETE is (or was) sent under this lock
            return self._send("PUT", json.dumps(record).encode())

    def _run(self) -> None:
        """Beat every ``ttl_s / 3`` on a fixed cadence (a slow beat does not delay the next);
        until the first registration succeeds (the endpoint still starting) every 0.2 s;
        and, between beats, as soon as the models served change (checked every
        ``CHECK_S`` from the loaded-models gauge alone), so that a load or an unload is
        announced within about a second. A change whose beat failed is not sent again
        every second: the next periodic beat carries it."""
        period = self.settings.ttl_s / 3
        due, registered, attempted = time.monotonic(), False, None
        while True:
            now = time.monotonic()
            try:
                periodic = now >= due
                served = self.served(full=periodic)
                if periodic or served[0] != attempted:
                    if not periodic:
                        served = self.served()  # the beat carries the load totals too
                    attempted = served[0]
                    if self.beat(served) == 200:
                        registered = True
                    if periodic:
                        due = max(due + (period if registered else min(period, 0.2)), now)
            except ShardserveError as exc:  # never let the heartbeat thread die
                log.error("registration of node %s failed: %s", self.node_id, exc.message)
                due = max(due + period, now)
            except Exception as exc:  # noqa: BLE001 - e.g. a model file replaced under the
                # digest: the thread must live on, or the node's lease expires
                log.warning("registration of node %s: %s", self.node_id, type(exc).__name__)
                due = max(due + period, now)
            wake = min(due, time.monotonic() + CHECK_S)
            if self._stop.wait(max(0.0, wake - time.monotonic())):
                return

    def peers(self) -> list[dict]:
        """Other live nodes, as the registry endpoint shows them."""
        path = "/v2/shardserve/registry"
        request = urllib.request.Request(self.endpoint + path,
                                         headers=self._headers("GET", b"", path))
        with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
            nodes = json.loads(answer.read())["nodes"]
        return [n for n in nodes if n["id"] != self.node_id and n["state"] != "critical"
                and not n.get("expired") and n.get("url")]

    def probe_peers(self) -> None:
        """Measure the link to every peer once and smooth it into the published table."""
        try:
            peers = self.peers()
        except (OSError, ValueError, KeyError):
            return  # the endpoint is down: probe next time
        self.links.forget({p["id"] for p in peers})
        for peer in peers:
            if self._stop.is_set():
                return
            try:
                link = probe(peer["url"], lambda path, body: self._headers("POST", body, path),
                             timeout_s=self.timeout_s)
            except OSError:
                continue  # unreachable now: its entry keeps the last estimate
            self.links.update(peer["id"], link)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.settings.probe_s):
            self.probe_peers()

    def start(self) -> RegistrationAgent:
        self._headers("PUT", b"")  # missing credentials fail here, at startup
        # Import and digest everything a heartbeat needs here, before the threads start:
        # gunicorn forks its workers right after this, and a worker forked while the
        # heartbeat thread is importing a module (prometheus_client's) inherits that
        # module's import lock held by no thread, and hangs at its first import of it.
        # The same holds for the codec every connection to a host name loads on first use
        # (socket.create_connection encodes the host with "idna"): seen as a worker whose
        # first remote shard call hung for good.
        importlib.import_module("encodings.idna")
        self.served()
        self._pid = os.getpid()
        self._threads = [threading.Thread(target=self._run, name="shardserve-registration",
                                          daemon=True)]
        if self.settings.probe_s:
            self._threads.append(threading.Thread(target=self._probe_loop, daemon=True,
                                                  name="shardserve-link-probe"))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop heartbeating and deregister (best effort: the lease expires anyway).

        A node registered through its own server (no ``endpoint``) may be past serving when
        it stops; it then removes its own record from the store directly.

        Only in the process that started it: a gunicorn worker forked from the master
        leaves through the same ``finally`` and must neither deregister the node the
        master still serves nor wait on a lock a master thread held at the fork."""
        if os.getpid() != self._pid:
            return
        self._stop.set()
        for thread in self._threads:  # a call in flight ends within its timeout
            thread.join(self.timeout_s + 1)
        self._threads = []
        config = self.config
        with self._send_lock:  # a beat still in flight (past its join) ends first
            status = self._send("DELETE")
        if status == 200 or config is None or self.settings.endpoint:
            return
        from .settings import open_store

        try:
            store = open_store(config, self.settings)
            for record in store.nodes():
                if record.get("id") == self.node_id and record.get("url") == self.url:
                    store.deregister(self.node_id, record.get("owner", ""))
        except ShardserveError as exc:
            log.warning("node %s could not deregister: %s", self.node_id, exc.message)


def start_registration(config: Any, host: str, port: int) -> RegistrationAgent | None:
    """The agent for a server bound to ``host:port`` when ``[registry] enabled``, else None."""
    settings = registry_settings(config)
    if not settings.enabled:
        return None
    shown = f"[{host}]" if ":" in host else host
    url = settings.url or f"http://{shown}:{port}"
    node_id = settings.node_id or f"{host}:{port}".replace("[", "").replace("]", "")
    return RegistrationAgent(settings, Path(config.repository), url, node_id,
                             config).start()
