"""Registration: a serving node announces itself and heartbeats until it stops.

One thread in the serving process (gunicorn's master, or the dev server's process), so a
node killed with SIGKILL stops heartbeating at once and its lease expires. Every
``ttl_s / 3`` it sends its record (id, URL, pools, the models and versions in its repository
with their sha256, capabilities, load) to ``[registry] endpoint`` (its own server by default)
as an authenticated ``PUT``; on a clean stop it sends ``DELETE``. A failed heartbeat is
logged once and retried on the next beat (the store may be down: the node keeps serving).
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

from .links import LinkTable, probe
from .settings import RegistrySettings, registry_settings

log = logging.getLogger("shardserve.registry")

MODEL_FILES = ("model.onnx", "plan.toml")


def repository_models(repository: Path) -> list[dict]:
    """``{name, version, sha256}`` of each version directory holding a model or plan file."""
    found = []
    if not repository.is_dir():
        return found
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        for version in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            for name in MODEL_FILES:
                path = version / name
                if path.is_file():
                    digest = file_sha256(path)  # streamed: models can be GBs
                    found.append({"name": model_dir.name, "version": version.name,
                                  "sha256": digest})
                    break
    return found


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
        self.models = repository_models(repository)
        self.capabilities = capabilities()
        self.last_status: int | None = None
        self.latency_ms: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
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
            with urllib.request.urlopen(request, timeout=self.settings.ttl_s / 2) as answer:
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

    def beat(self) -> int:
        record = {"url": self.url, "pools": list(self.settings.pools), "models": self.models,
                  "capabilities": self.capabilities,
                  "load": {"heartbeat_latency_ms": self.latency_ms},
                  "links": dict(self.links.links)}
        return self._send("PUT", json.dumps(record).encode())

    def _run(self) -> None:
        from runtime.errors import ShardserveError

        period = self.settings.ttl_s / 3
        due, registered = time.monotonic(), False
        while True:
            try:
                registered = self.beat() == 200 or registered
            except ShardserveError as exc:  # never let the heartbeat thread die
                log.error("registration of node %s failed: %s", self.node_id, exc.message)
            # a fixed cadence (a slow beat does not delay the next one); until the first
            # registration succeeds (the endpoint still starting), retry sooner
            due = max(due + (period if registered else min(period, 0.2)), time.monotonic())
            if self._stop.wait(due - time.monotonic()):
                return

    def peers(self) -> list[dict]:
        """Other live nodes, as the registry endpoint shows them."""
        path = "/v2/shardserve/registry"
        request = urllib.request.Request(self.endpoint + path,
                                         headers=self._headers("GET", b"", path))
        with urllib.request.urlopen(request, timeout=self.settings.ttl_s) as answer:
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
                link = probe(peer["url"], lambda path, body: self._headers("POST", body, path))
            except OSError:
                continue  # unreachable now: its entry keeps the last estimate
            self.links.update(peer["id"], link)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.settings.probe_s):
            self.probe_peers()

    def start(self) -> RegistrationAgent:
        self._headers("PUT", b"")  # missing credentials fail here, at startup
        self._thread = threading.Thread(target=self._run, name="shardserve-registration",
                                        daemon=True)
        self._thread.start()
        if self.settings.probe_s:
            threading.Thread(target=self._probe_loop, name="shardserve-link-probe",
                             daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop heartbeating and deregister (best effort: the lease expires anyway).

        A node registered through its own server (no ``endpoint``) may be past serving when
        it stops; it then removes its own record from the store directly."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.ttl_s)
        config = self.config
        if self._send("DELETE") == 200 or config is None or self.settings.endpoint:
            return
        from runtime.errors import ShardserveError

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
