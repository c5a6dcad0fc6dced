"""Registration and discovery (docs/registry.md) against a real etcd on loopback and the
embedded SQLite store: the store contract (leases, owners), the authenticated registration
route, and three ``shardserve serve`` nodes behind a ``pool:`` placement that lose one node
to SIGKILL, lose the store, and get both back."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHARDSERVE, add_model, write_model
from executor_support import free_port

from plugins.security.hmac_signing import sign_request
from runtime import Runtime
from runtime.errors import ConfigError, Forbidden, ServiceUnavailable
from runtime.messages import InferInput, InferRequest

TTL = 3.0
SECRETS = {"node-a": b"a" * 32, "node-b": b"b" * 32, "node-c": b"c" * 32}


class Etcd:
    """A single-member etcd on free loopback ports with a temp data dir."""

    def __init__(self, data: Path):
        self.data, self.port, self.peer = data, free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.data),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as answer:
                    if json.loads(answer.read()).get("health") == "true":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("etcd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(autouse=True, scope="module")
def _no_refresh_threads_left():
    """No directory keeps polling (a stopped etcd) after this module's tests."""
    from plugins.registry.directory import close_all

    yield
    close_all()
    assert not [t for t in threading.enumerate() if t.name.startswith("shardserve-regist")]


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path, monkeypatch):
    """Each test its own embedded store (SHARDSERVE_STATE_DIR beats the config file)."""
    monkeypatch.setenv("SHARDSERVE_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (`make etcd` installs Debian's etcd-server)")
    server = Etcd(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()


def registry_config(kind: str, etcd_url: str | None, tmp: Path) -> dict:
    section = {"enabled": True, "store": kind, "ttl_s": TTL}
    if kind == "etcd":
        section.update(etcd_endpoints=[etcd_url], prefix=f"/t{free_port()}/")
    return {"registry": section, "server": {"state_dir": str(tmp / "state")}}


@pytest.fixture(params=["embedded", "etcd"])
def store(request, tmp_path):
    from plugins.registry.settings import open_store, registry_settings
    from runtime.config import load_config

    url = request.getfixturevalue("etcd").url if request.param == "etcd" else None
    (tmp_path / "repo").mkdir()
    config = load_config({"repository": {"path": str(tmp_path / "repo")},
                          **registry_config(request.param, url, tmp_path)})
    return open_store(config, registry_settings(config))


# --------------------------------------------------------------------------- the store


def test_a_store_keeps_a_node_while_its_lease_lives_and_its_owner_alone_writes(store):
    store.heartbeat("n1", {"id": "n1", "url": "http://a"}, "hmac:node-a", TTL)
    assert [(r["id"], r["owner"]) for r in store.nodes()] == [("n1", "hmac:node-a")]
    with pytest.raises(Forbidden):  # another principal cannot claim the id
        store.heartbeat("n1", {"id": "n1", "url": "http://evil"}, "hmac:node-b", TTL)
    with pytest.raises(Forbidden):
        store.deregister("n1", "hmac:node-b")
    assert [r["url"] for r in store.nodes()] == ["http://a"]
    store.heartbeat("n1", {"id": "n1", "url": "http://a2"}, "hmac:node-a", TTL)  # refresh
    assert [r["url"] for r in store.nodes()] == ["http://a2"]
    store.deregister("n1", "hmac:node-a")
    assert store.nodes() == []


@pytest.mark.slow
def test_an_expired_lease_removes_the_node_and_frees_its_id(store):
    store.heartbeat("n2", {"id": "n2", "url": "http://a"}, "hmac:node-a", 2)
    start = time.monotonic()
    while store.nodes() and time.monotonic() - start < 10:
        time.sleep(0.1)
    assert store.nodes() == [] and time.monotonic() - start <= 4
    store.heartbeat("n2", {"id": "n2", "url": "http://b"}, "hmac:node-b", TTL)
    assert [r["owner"] for r in store.nodes()] == ["hmac:node-b"]
    store.deregister("n2", "hmac:node-b")


def test_an_unreachable_etcd_is_a_503_not_a_hang():
    from plugins.registry.stores import EtcdRegistry

    start = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        EtcdRegistry([f"http://127.0.0.1:{free_port()}"]).nodes()
    assert time.monotonic() - start < 2 and "127.0.0.1" not in caught.value.message


@pytest.mark.parametrize("section, message", [
    ({"ttl_s": 1}, "ttl_s"), ({"pools": "cloud"}, "pools"), ({"node_id": "a/b"}, "node_id"),
    ({"enabled": "yes"}, "enabled"), ({"colour": 1}, "unknown keys"),
])
def test_a_bad_registry_section_fails_at_startup(tmp_path, section, message):
    (tmp_path / "repo").mkdir()
    with pytest.raises(ConfigError, match=message):
        Runtime.from_config({"repository": {"path": str(tmp_path / "repo")},
                             "registry": section}).start()


# --------------------------------------------------------------------------- the route


def secured(base: dict) -> dict:
    clients = {name: {"secret_env": f"REG_{name.upper().replace('-', '_')}",
                      "actions": ["register", "metadata", "infer"], "models": ["*"]}
               for name in SECRETS}
    return {**base, "security": {"enabled": True, "hmac": {"clients": clients}}}


@pytest.fixture
def secret_env(monkeypatch):
    for name, secret in SECRETS.items():
        monkeypatch.setenv(f"REG_{name.upper().replace('-', '_')}",
                           base64.b64encode(secret).decode())


@pytest.mark.parametrize("kind", ["embedded", "etcd"])
def test_registration_needs_the_owners_credentials(request, kind, tmp_path, secret_env):
    from handlers.flask_app import create_app

    url = request.getfixturevalue("etcd").url if kind == "etcd" else None
    write_model(tmp_path / "repo" / "double" / "1" / "model.onnx", add_model())
    config = secured({"repository": {"path": str(tmp_path / "repo")},
                      **registry_config(kind, url, tmp_path)})
    client = create_app(Runtime.from_config(config)).test_client()
    path = "/v2/shardserve/registry/nodes/n1"
    body = json.dumps({"url": "http://127.0.0.1:1", "pools": ["cloud"],
                       "models": [{"name": "double", "version": "1", "sha256": "ab"}]}).encode()

    def send(method, who=None, data=body, secret=None, node_path=path):
        headers = {}
        if who:
            headers = sign_request(secret or SECRETS[who], who, method, node_path, data)
        return client.open(node_path, method=method, data=data, headers=headers)

    assert send("PUT").status_code == 401  # no credentials
    assert send("PUT", "node-a", secret=b"x" * 32).status_code == 401  # wrong secret
    answer = send("PUT", "node-a")
    assert answer.status_code == 200 and answer.get_json() == {"id": "n1", "ttl_s": TTL}
    assert send("PUT", "node-b").status_code == 403  # another node's id
    assert send("DELETE", "node-b", data=b"").status_code == 403
    assert send("DELETE", None, data=b"").status_code == 401
    assert send("DELETE", "node-a", data=b"", secret=b"x" * 32).status_code == 401
    assert send("PUT", "node-a", data=b"{nope").status_code == 400
    assert send("PUT", "node-a", data=b'{"url": "file:///etc"}').status_code == 400
    bad_id = "/v2/shardserve/registry/nodes/.."
    assert send("PUT", "node-a", node_path=bad_id).status_code in (400, 404)
    view = client.get("/v2/shardserve/registry", headers=sign_request(
        SECRETS["node-c"], "node-c", "GET", "/v2/shardserve/registry"))
    assert view.status_code == 200
    nodes = view.get_json()["nodes"]
    assert [(n["id"], n["state"], n["pools"]) for n in nodes] == [("n1", "passing", ["cloud"])]
    assert nodes[0]["models"] == [{"name": "double", "version": "1", "sha256": "ab"}]
    assert send("DELETE", "node-a", data=b"").status_code == 200
    nodes = client.get("/v2/shardserve/registry", headers=sign_request(
        SECRETS["node-c"], "node-c", "GET", "/v2/shardserve/registry")).get_json()["nodes"]
    assert [(n["id"], n["state"], n.get("expired")) for n in nodes] == [("n1", "critical", True)]


def test_the_registry_route_is_404_when_the_registry_is_off(tiny_repo):
    from handlers.flask_app import create_app

    client = create_app(Runtime.from_config({"repository": {"path": str(tiny_repo)}}))
    answer = client.test_client().get("/v2/shardserve/registry")
    assert answer.status_code == 404 and "not enabled" in answer.get_json()["error"]


# --------------------------------------------------------------------------- three nodes


class Node:
    """``shardserve serve --dev`` on a fixed port, registering itself as ``node_id``."""

    def __init__(self, node_id: str, repo: Path, config: Path):
        self.node_id, self.repo, self.config, self.port = node_id, repo, config, free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "SHARDSERVE_LOG_LEVEL": "WARNING",
               **{f"REG_{n.upper().replace('-', '_')}": base64.b64encode(s).decode()
                  for n, s in SECRETS.items()}}
        self.proc = subprocess.Popen(
            [str(SHARDSERVE), "--config", str(self.config), "serve", "--dev", "--repository",
             str(self.repo), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def node_config(path: Path, base: dict, tmp: Path, node_id: str | None = None,
                client: str | None = None, endpoint: str | None = None) -> Path:
    """A worker node (``node_id``: registers through ``endpoint`` as HMAC ``client``,
    serves without security) or, without ``node_id``, the secured registration endpoint."""
    lines = ["[registry]", *(f"{k} = {json.dumps(v)}" for k, v in base.items())]
    if node_id:
        lines += [f'node_id = "{node_id}"', 'pools = ["cloud"]', f'hmac_client = "{client}"',
                  f'hmac_secret_env = "REG_{client.upper().replace("-", "_")}"',
                  f'endpoint = "{endpoint}"']
    lines += ["[server]", f'state_dir = "{tmp / "state"}"']
    if node_id:
        path.write_text("\n".join(lines) + "\n")
        return path
    lines += ["[security]", "enabled = true"]
    for name in SECRETS:
        lines += [f"[security.hmac.clients.{name}]",
                  f'secret_env = "REG_{name.upper().replace("-", "_")}"',
                  'actions = ["register", "metadata", "infer"]', 'models = ["*"]']
    path.write_text("\n".join(lines) + "\n")
    return path


def front_repo(root: Path) -> Path:
    """A one-shard plan whose shard runs on any replica of pool ``cloud`` (y = x + x)."""
    version = root / "front" / "1"
    write_model(version / "s0.onnx", add_model())
    (version / "plan.toml").write_text(
        'format = 1\ninputs = [{name = "x", datatype = "FP32", shape = [-1, 4]}]\n'
        'outputs = [{name = "y", datatype = "FP32", shape = [-1, 4]}]\n'
        '[[shards]]\nname = "s0"\nfile = "s0.onnx"\nplacement = "pool:cloud/double"\n'
        'inputs = ["x"]\noutputs = ["y"]\n')
    (root / "front" / "model.toml").write_text("")
    return root


def wait_for(condition, timeout: float, step: float = 0.05):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        value = condition()
        if value:
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "etcd"])
def test_three_nodes_register_fail_over_and_come_back(request, kind, tmp_path):
    url = request.getfixturevalue("etcd").url if kind == "etcd" else None
    cloud = tmp_path / "cloud"
    write_model(cloud / "double" / "1" / "model.onnx", add_model())
    nodes = []
    config = registry_config(kind, url, tmp_path)  # one etcd prefix for all
    (tmp_path / "empty").mkdir()
    try:
        endpoint = Node("registry", tmp_path / "empty",
                        node_config(tmp_path / "registry.toml", config["registry"], tmp_path))
        nodes.append(endpoint)
        wait_for(lambda: _serving(endpoint.url), 60)
        for i, client in enumerate(SECRETS):
            conf = node_config(tmp_path / f"n{i}.toml", config["registry"], tmp_path, f"n{i}",
                               client, endpoint.url)
            nodes.append(Node(f"n{i}", cloud, conf))
        replicas = nodes[1:]
        front = Runtime.from_config({"repository": {"path": str(front_repo(tmp_path / "f"))},
                                     **config}).start()
        from plugins.registry.directory import Directory
        from plugins.registry.settings import open_store, registry_settings

        settings = registry_settings(front.config)
        view = Directory(open_store(front.config, settings), TTL, 0.1)

        def states() -> dict:
            view.refresh()
            return {n["id"]: n["state"] for n in view.view()["nodes"]}

        # registration visible within 1 s of the node serving
        for node in replicas:
            wait_for(lambda n=node: _serving(n.url), 60)
        took = wait_for(lambda: states() == {"n0": "passing", "n1": "passing",
                                            "n2": "passing"}, 1.0)
        assert took <= 1.0
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        errors: list = []
        done = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                client_once(front, x, done, errors)

        workers = [threading.Thread(target=client) for _ in range(2)]
        for worker in workers:
            worker.start()
        wait_for(lambda: len(done) > 20, 30)
        killed_at = time.monotonic()
        replicas[1].kill()
        critical_s = wait_for(lambda: states().get("n1") == "critical", 10)
        routed = front_directory(front)
        wait_for(lambda: replicas[1].url not in routed.replicas("cloud", "double"), TTL)
        unrouted_s = time.monotonic() - killed_at
        assert all(replicas[1].url not in routed.replicas("cloud", "double") for _ in range(6))
        after = len(done)
        wait_for(lambda: len(done) > after + 20, 30)
        stop.set()
        for worker in workers:
            worker.join(30)
        assert errors == []  # a replica remained: no request failed
        assert critical_s <= TTL, f"critical after {critical_s:.2f} s"
        first_ok = min(t for t in done if t > killed_at) - killed_at
        print(f"\n{kind}: SIGKILL -> critical {critical_s:.2f} s, -> out of the routing view "
              f"{unrouted_s:.2f} s, -> first request answered {first_ok * 1000:.1f} ms")
        # the node comes back and registers again
        replicas[1].start()
        wait_for(lambda: states().get("n1") == "passing", 60)
        if kind == "etcd":  # the store stops: serving goes on from the last view
            etcd = request.getfixturevalue("etcd")
            assert not registry_status(endpoint.url)["stale"]
            etcd.stop()
            wait_for(lambda: routed.view()["stale"], 2)
            before, errors_before = len(done), len(errors)
            for _ in range(20):
                client_once(front, x, done, errors)
            assert len(done) == before + 20 and len(errors) == errors_before
            view.refresh()
            assert view.view()["stale"] and states()["n0"] == "passing"
            shown = registry_status(endpoint.url)  # the status route says so, and shows
            # the nodes as of its last good read
            assert shown["stale"] and not shown["watching"]
            assert {n["id"] for n in shown["nodes"]} >= {"n0", "n1", "n2"}
            etcd.start()  # back: the view reconciles, the nodes heartbeat again
            wait_for(lambda: not routed.view()["stale"], 5)
            wait_for(lambda: not registry_status(endpoint.url)["stale"], 5)
            wait_for(lambda: states() == {"n0": "passing", "n1": "passing",
                                          "n2": "passing"}, 5)
        # a clean stop deregisters at once (well before the lease would expire)
        replicas[2].terminate()
        wait_for(lambda: states().get("n2") == "critical"
                 and any(n["id"] == "n2" and n.get("expired") for n in view.view()["nodes"]),
                 TTL / 2)
        front.close()
    finally:
        for node in nodes:
            node.kill()


def registry_status(url: str) -> dict:
    """``GET /v2/shardserve/registry`` of a secured node, signed as node-c."""
    path = "/v2/shardserve/registry"
    request = urllib.request.Request(url + path, headers=sign_request(
        SECRETS["node-c"], "node-c", "GET", path))
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def client_once(front: Runtime, x: np.ndarray, done: list, errors: list) -> None:
    try:
        out = front.infer("front", InferRequest(inputs=[InferInput("x", "FP32", x.shape, x)]),
                          deadline=time.monotonic() + 3).outputs
        np.testing.assert_allclose(out["y"], x + x)
        done.append(time.monotonic())
    except Exception as exc:  # noqa: BLE001 - every failure counts
        errors.append(exc)


def _serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def front_directory(front: Runtime):
    from plugins.registry.directory import directory_for
    from plugins.registry.settings import open_store, registry_settings

    settings = registry_settings(front.config)
    return directory_for(open_store(front.config, settings), settings.ttl_s, settings.refresh_s)


@pytest.mark.slow
def test_a_gunicorn_node_registers_through_itself_and_leaves_on_sigterm(tmp_path):
    """The default single-host setup: embedded store, security off, `shardserve serve`
    (gunicorn; the agent in its master); `shardserve nodes` reads the same store. The
    heartbeat carries the versions the workers have loaded (an unloaded one leaves the
    record) and the load of the last interval (requests/s, latency, queue depth)."""
    import hashlib

    from conftest import ServerProcess

    repo = tmp_path / "repo"
    model = write_model(repo / "double" / "1" / "model.onnx", add_model())
    write_model(repo / "spare" / "1" / "model.onnx", add_model())
    config = tmp_path / "node.toml"
    # a lease far longer than the test: an empty store after the stop can only be a DELETE
    config.write_text(f'[registry]\nenabled = true\npools = ["edge"]\nttl_s = 600\n'
                      f'[server]\nstate_dir = "{tmp_path / "state"}"\n')

    def nodes() -> dict:
        out = subprocess.run([str(SHARDSERVE), "--config", str(config), "nodes", "--json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        return {n["id"]: n for n in json.loads(out.stdout)["nodes"]}

    def served(node_id: str) -> list:
        return sorted(m["name"] for m in nodes().get(node_id, {}).get("models", []))

    server = ServerProcess(["--config", str(config), "serve", "--repository", str(repo),
                            "--workers", "2"])
    try:
        node_id = f"127.0.0.1:{server.port}"
        wait_for(lambda: served(node_id) == ["double", "spare"], 30, step=0.2)
        node = nodes()[node_id]
        assert node["state"] == "passing" and node["url"] == server.base
        assert node["pools"] == ["edge"] and node["capabilities"]["memory_bytes"] > 0
        assert node["models"][0] == {"name": "double", "version": "1", "loaded": True,
                                     "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                       "data": list(range(8))}]}).encode()
        stop, answered = threading.Event(), []

        def client():
            while not stop.is_set():
                request = urllib.request.Request(server.base + "/v2/models/double/infer",
                                                 data=body, method="POST")
                answered.append(urllib.request.urlopen(request, timeout=10).read())

        clients = [threading.Thread(target=client) for _ in range(2)]
        for thread in clients:
            thread.start()
        wait_for(lambda: len(answered) > 50, 30)
        stop.set()
        for thread in clients:
            thread.join(30)
        # a version the workers unloaded leaves the record at once (not after ttl_s / 3 =
        # 200 s); that heartbeat carries the load since the last one, the requests above
        urllib.request.urlopen(urllib.request.Request(
            server.base + "/v2/repository/models/spare/unload", data=b"{}", method="POST"),
            timeout=30).read()
        wait_for(lambda: served(node_id) == ["double"], 15, step=0.2)
        load = nodes()[node_id]["load"]
        assert load["requests_per_s"] > 0 and load["latency_ms"] > 0
        assert load["in_flight"] > 0 and load["queue_depth"] >= 0
        assert load["heartbeat_latency_ms"] > 0
        view = json.loads(urllib.request.urlopen(server.base + "/v2/shardserve/registry",
                                                 timeout=10).read())
        assert [n["load"] for n in view["nodes"]] == [load]
        table = subprocess.run([str(SHARDSERVE), "--config", str(config), "nodes"],
                               capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
        assert node_id in table and "passing" in table and "double/1" in table
        assert "REQ/S" in table and f"{load['requests_per_s']:.1f}" in table
    finally:
        server.stop()
    from plugins.registry.stores import EmbeddedRegistry

    left = EmbeddedRegistry(tmp_path / "state" / "registry.sqlite").nodes()
    assert [n["id"] for n in left] == []


def test_nodes_says_when_the_store_cannot_be_reached(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[registry]\nstore = "etcd"\n'
                      f'etcd_endpoints = ["http://127.0.0.1:{free_port()}"]\n')
    out = subprocess.run([str(SHARDSERVE), "--config", str(config), "nodes"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "cannot be reached" in out.stdout
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- measured links


@pytest.mark.parametrize("bandwidth, rtt", [("20Mbps", "20ms"), ("100Mbps", "10ms"),
                                           pytest.param("1Mbps", "20ms", marks=pytest.mark.slow)])
def test_a_link_probe_measures_the_emulated_link_within_10_percent(bandwidth, rtt):
    """An echo server behind the executors' link emulator (one RTT plus both payloads over
    the bandwidth): the probe recovers the configured RTT and bandwidth (at 1 Mbps too,
    where a fixed 256 KiB echo would take 4 s: the pilot echo sizes the large one)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from plugins.executors.base import EmulatedLink
    from plugins.registry.links import LinkTable, probe

    link = EmulatedLink({"link_bandwidth": bandwidth, "link_rtt": rtt})

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as shardserve's servers
        disable_nagle_algorithm = True

        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(link.delay(2 * len(body)))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        table = LinkTable()
        for _ in range(2):
            entry = table.update("peer", probe(f"http://127.0.0.1:{server.server_port}",
                                               lambda path, body: {}))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert entry["samples"] == 2
    assert entry["rtt_s"] == pytest.approx(link.link.rtt_s, rel=0.10)
    assert entry["bandwidth_bps"] == pytest.approx(link.link.bandwidth_bps, rel=0.10)


@pytest.mark.slow
def test_nodes_probe_each_other_and_publish_their_links(tmp_path):
    repo = tmp_path / "repo"
    write_model(repo / "double" / "1" / "model.onnx", add_model())
    base = {"enabled": True, "ttl_s": TTL, "probe_s": 0.3}
    nodes = []
    try:
        for i in range(2):
            conf = tmp_path / f"n{i}.toml"
            conf.write_text("[registry]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                     for k, v in base.items())
                            + f'node_id = "n{i}"\n')
            nodes.append(Node(f"n{i}", repo, conf))

        def links() -> dict:
            from plugins.registry.stores import EmbeddedRegistry

            try:
                store = EmbeddedRegistry(tmp_path / "state" / "registry.sqlite")
            except ServiceUnavailable:  # no node has created the state dir yet
                return {}
            return {r["id"]: r.get("links", {}) for r in store.nodes()}

        wait_for(lambda: all(links().get(f"n{i}", {}).get(f"n{1 - i}") for i in range(2)),
                 30, step=0.2)
        for i in range(2):
            seen = links()[f"n{i}"][f"n{1 - i}"]
            assert 0 < seen["rtt_s"] < 0.1 and seen["bandwidth_bps"] > 1e7  # loopback
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.slow
def test_plan_takes_its_link_from_the_registry(tmp_path):
    """`shardserve plan --links registry:edge,cloud` plans exactly as with the published
    figures given by hand (the mean over the pool's nodes the edge measured)."""
    from plugins.registry.stores import EmbeddedRegistry

    config = tmp_path / "c.toml"
    config.write_text("[registry]\nenabled = true\n")
    store = EmbeddedRegistry(_state_file(tmp_path))
    links = {"c1": {"rtt_s": 0.02, "bandwidth_bps": 8e6, "samples": 3},
             "c2": {"rtt_s": 0.04, "bandwidth_bps": 12e6, "samples": 3}}
    store.heartbeat("edge", {"id": "edge", "url": "http://e", "pools": ["edge"],
                             "links": links, "heartbeat": time.time()}, "anonymous", 60)
    for peer in ("c1", "c2"):
        store.heartbeat(peer, {"id": peer, "url": f"http://{peer}", "pools": ["cloud"],
                               "heartbeat": time.time()}, "anonymous", 60)

    def plan(*flags):
        out = subprocess.run([str(SHARDSERVE), "--config", str(config), "plan", "digits_mlp",
                              "-r", str(ROOT / "examples" / "models"), "--strategy",
                              "edge-cloud", "--json", *flags],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        return out.returncode, out.stdout, out.stderr

    code, by_registry, err = plan("--links", "registry:edge,cloud")
    assert code == 0, err
    assert plan("--bandwidth", "10000000", "--rtt", "0.03")[1] == by_registry
    assert plan("--bandwidth", "1000", "--rtt", "0.5")[1] != by_registry  # it can differ
    code, _, err = plan("--links", "registry:nobody,cloud")
    assert code != 0 and "not registered" in err and "Traceback" not in err


def _state_file(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return state / "registry.sqlite"


def test_jwt_principals_own_their_nodes_too(tmp_path, monkeypatch):
    import jwt

    from handlers.flask_app import create_app

    secret = b"j" * 32
    monkeypatch.setenv("REG_JWT", base64.b64encode(secret).decode())
    (tmp_path / "repo").mkdir()
    config = {"repository": {"path": str(tmp_path / "repo")},
              **registry_config("embedded", None, tmp_path),
              "security": {"enabled": True, "jwt": {"keys": {"k1": {
                  "algorithm": "HS256", "secret_env": "REG_JWT"}}}}}
    client = create_app(Runtime.from_config(config)).test_client()

    def token(sub: str, exp: float = 60) -> dict:
        claims = {"sub": sub, "exp": int(time.time() + exp), "actions": ["register"]}
        return {"Authorization": "Bearer " + jwt.encode(claims, secret, "HS256",
                                                        headers={"kid": "k1"})}

    path, body = "/v2/shardserve/registry/nodes/n9", json.dumps({"url": "http://a:1"})
    assert client.put(path, data=body, headers=token("edge-a")).status_code == 200
    assert client.put(path, data=body, headers=token("edge-b")).status_code == 403
    assert client.delete(path, headers=token("edge-b")).status_code == 403
    assert client.put(path, data=body, headers=token("edge-a", exp=-120)).status_code == 401
    assert client.delete(path, headers=token("edge-a")).status_code == 200


# --------------------------------------------------------------------------- re-planning


@pytest.fixture(scope="module")
def cnn_repo(tmp_path_factory):
    from conftest import EXAMPLES

    root = tmp_path_factory.mktemp("replan")
    shutil.copytree(EXAMPLES / "cnn_skip", root / "cnn_skip")
    return root


DEPLOYED = {"bandwidth": "100Mbps", "rtt": "1ms", "edge_factor": "20"}


def test_replanning_needs_a_confirmed_gain_and_is_rate_limited(cnn_repo):
    from plugins.links import Link
    from plugins.partitioners.build import analyse
    from plugins.registry.replan import Replanner

    analysis = analyse(cnn_repo, "cnn_skip")
    r = Replanner(analysis, dict(DEPLOYED), threshold=0.2, confirm=2, min_interval_s=60)
    slow, fast = Link(1e6, 0.001), Link(100e6, 0.001)
    first = r.check(slow, now=0)
    assert first["gain"] > 0.2 and not first["replan"] and "1 of 2" in first["why"]
    second = r.check(slow, now=1)
    assert second["replan"] and r.options["bandwidth"] == 1e6
    # the new cut is the best one: no prefix of the graph does better under that link
    model, _ = r._edge(r.options)
    prefixes = [model.latency(set(range(k))) for k in range(len(analysis.graph) + 1)]
    assert second["best_s"] <= min(prefixes) + 1e-12 < second["deployed_s"]
    assert not r.check(slow, now=2)["replan"]  # deployed is best now: gain 0
    # a link that flickers back and forth never confirms
    assert not r.check(fast, now=3)["replan"]
    assert not r.check(slow, now=4)["replan"]
    assert not r.check(fast, now=5)["replan"]
    limited = r.check(fast, now=6)  # confirmed, but 5 s after the last re-plan
    assert not limited["replan"] and "last re-plan" in limited["why"]
    assert r.check(fast, now=100)["replan"] and r.options["bandwidth"] == 100e6


@pytest.mark.slow
def test_replan_command_writes_a_new_version_from_the_registry_link(cnn_repo, tmp_path):
    from plugins.registry.stores import EmbeddedRegistry

    subprocess.run([str(SHARDSERVE), "partition", "cnn_skip", "-r", str(cnn_repo),
                    "--strategy", "edge-cloud", *[f"--{k.replace('_', '-')}={v}"
                                                  for k, v in DEPLOYED.items()]],
                   check=True, capture_output=True, cwd=ROOT, timeout=300)
    versions = sorted(int(p.name) for p in (cnn_repo / "cnn_skip").iterdir()
                      if p.name.isdigit())
    config = tmp_path / "c.toml"
    config.write_text("[registry]\nenabled = true\n")
    store = EmbeddedRegistry(_state_file(tmp_path))
    store.heartbeat("edge", {"id": "edge", "url": "http://e", "pools": ["edge"], "links": {
        "c1": {"rtt_s": 0.001, "bandwidth_bps": 1e6, "samples": 5}},
        "heartbeat": time.time()}, "anonymous", 60)
    store.heartbeat("c1", {"id": "c1", "url": "http://c1", "pools": ["cloud"],
                           "heartbeat": time.time()}, "anonymous", 60)
    out = subprocess.run([str(SHARDSERVE), "--config", str(config), "replan", "cnn_skip",
                          "-r", str(cnn_repo), "--links", "registry:edge,cloud",
                          "--confirm", "1", "--once"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout.splitlines()[-1])
    assert decision["replan"] and decision["version"] == versions[-1] + 1
    plan = (cnn_repo / "cnn_skip" / str(decision["version"]) / "plan.toml").read_text()
    assert 'strategy = "edge-cloud"' in plan and "bandwidth = 1000000.0" in plan


def test_repository_models_streams_each_model_file(tmp_path, monkeypatch):
    """The startup digest reads models in blocks: a multi-GB model is never loaded whole."""
    import hashlib

    from plugins.registry.agent import repository_models

    version = tmp_path / "big" / "1"
    version.mkdir(parents=True)
    data = os.urandom(3 << 20)
    (version / "model.onnx").write_bytes(data)

    def whole_file(self):
        raise AssertionError("read_bytes loads the whole model")

    monkeypatch.setattr(Path, "read_bytes", whole_file)
    assert repository_models(tmp_path) == [
        {"name": "big", "version": "1", "sha256": hashlib.sha256(data).hexdigest()}]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_corrupt_etcd_entry_is_absent_not_a_500(etcd, tmp_path, raw):
    from plugins.registry.stores import EtcdRegistry

    store = EtcdRegistry([etcd.url], f"/t{free_port()}/")
    store._post("/v3/kv/put", {"key": base64.b64encode(store._key("node-a").encode()).decode(),
                               "value": base64.b64encode(raw).decode()})
    assert store._read("node-a")[0] is None
    store.heartbeat("node-a", {"id": "node-a"}, "node-a", TTL)  # overwrites the corrupt value
    assert [n["id"] for n in store.nodes()] == ["node-a"]


def test_a_pool_drops_the_connections_of_nodes_that_left(tmp_path, monkeypatch):
    """Node churn must not accumulate urllib3 pools and breakers for URLs long gone."""
    from plugins.registry import directory as directory_module
    from plugins.registry.directory import Directory
    from plugins.registry.pool import PoolExecutor
    from plugins.registry.stores import EmbeddedRegistry

    monkeypatch.setattr(directory_module, "GONE_KEPT_S", 0)  # a node that left is gone at once
    store = EmbeddedRegistry(tmp_path / "registry.db")
    executor = PoolExecutor.__new__(PoolExecutor)  # just the bookkeeping under test
    executor.options, executor.pools, executor.breakers, executor._in_use = {}, {}, {}, {}
    executor._endpoints_lock = threading.Lock()
    executor.directory = Directory(store, TTL, 60)
    for i in range(5):
        url = f"http://127.0.0.1:{9000 + i}"
        store.heartbeat(f"n{i}", {"id": f"n{i}", "url": url, "pools": ["p"], "models": []},
                        f"hmac:n{i}", TTL)
        if i:
            store.deregister(f"n{i - 1}", f"hmac:n{i - 1}")
        executor.directory.refresh_if_older(0)
        executor._endpoint(url)
        executor._in_use.clear()
        assert sorted(executor.pools) == sorted(executor.breakers) == [url]


# --------------------------------------------------------------------------- load, watches, threads


def test_the_load_is_the_interval_between_two_heartbeats():
    """Requests/s, mean latency, and by Little's law the mean number of requests in the
    server and in batching queues: summed time over the interval."""
    from plugins.registry.agent import LoadMeter

    meter = LoadMeter()
    assert meter.sample({"count": 10, "sum_us": 5e5, "queue_us": 1e5}, 100.0) == {}
    load = meter.sample({"count": 30, "sum_us": 2.5e6, "queue_us": 6e5}, 102.0)
    assert load == {"requests_per_s": 10.0, "latency_ms": 100.0, "in_flight": 1.0,
                    "queue_depth": 0.25}
    idle = meter.sample({"count": 30, "sum_us": 2.5e6, "queue_us": 6e5}, 103.0)
    assert idle == {"requests_per_s": 0.0, "latency_ms": None, "in_flight": 0.0,
                    "queue_depth": 0.0}
    assert meter.sample({"count": 1, "sum_us": 1, "queue_us": 0}, 104.0) == {}  # restarted


def test_the_record_names_loaded_versions_and_plan_shards(tmp_path):
    """Only versions this server has loaded (its metrics' model_loaded gauge) are
    advertised, each plan with its shard files' sha256; a lazy server also advertises the
    versions it would load on the first request."""
    import hashlib

    from plugins.registry import agent as agent_module
    from plugins.registry.settings import parse

    repo = tmp_path / "repo"
    single = write_model(repo / "double" / "1" / "model.onnx", add_model())
    front_repo(repo)
    shard = repo / "front" / "1" / "s0.onnx"
    write_model(repo / "idle" / "1" / "model.onnx", add_model())
    agent = agent_module.RegistrationAgent(parse({"enabled": True}), repo, "http://a:1", "a")
    loaded = {("double", "1"), ("front", "1")}
    totals = {"count": 0.0, "sum_us": 0.0, "queue_us": 0.0}
    real = agent_module.served_metrics
    agent_module.served_metrics = lambda full=True: (loaded, totals)
    try:
        models, _ = agent.served()
        agent.lazy = True
        lazy, _ = agent.served()
    finally:
        agent_module.served_metrics = real
    digest = hashlib.sha256(single.read_bytes()).hexdigest()
    assert models[0] == {"name": "double", "version": "1", "sha256": digest, "loaded": True}
    assert models[1]["name"] == "front" and models[1]["shards"] == [
        {"name": "s0", "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}]
    assert [m["name"] for m in models] == ["double", "front"]
    assert [(m["name"], m["loaded"]) for m in lazy] == [("double", True), ("front", True),
                                                        ("idle", False)]


def test_an_etcd_watch_pushes_changes_and_polling_covers_a_broken_watch(etcd, tmp_path):
    """With etcd the view follows a prefix watch: a registration, a deregistration and a
    lease expiry show at once although the poll interval is a minute; etcd stopped: the
    watch ends, the view is stale; back: watching again, reconciled. The embedded store
    has no watch and is polled, as documented."""
    from plugins.registry.directory import Directory
    from plugins.registry.stores import EmbeddedRegistry, EtcdRegistry

    store = EtcdRegistry([etcd.url], f"/t{free_port()}/")
    # ttl_s 600, refresh_s 60: polling (every 600 s while watching, 60 s while not) cannot
    # be what makes any of the changes below show
    view = Directory(store, 600.0, 60.0).acquire()
    try:
        wait_for(lambda: view.watching, 2)
        store.heartbeat("w1", {"id": "w1", "url": "http://a", "heartbeat": time.time()},
                        "hmac:node-a", TTL)
        assert wait_for(lambda: "w1" in view.nodes, 0.5) <= 0.5
        store.deregister("w1", "hmac:node-a")
        wait_for(lambda: "w1" not in view.nodes and "w1" in view.gone, 0.5)
        store.heartbeat("w2", {"id": "w2", "url": "http://b", "heartbeat": time.time()},
                        "hmac:node-b", 2)  # left to expire: etcd deletes it, the watch says so
        wait_for(lambda: "w2" in view.nodes, 0.5)
        wait_for(lambda: "w2" not in view.nodes, 4)
        store.heartbeat("w3", {"id": "w3", "url": "http://c", "heartbeat": time.time()},
                        "hmac:node-c", 600)
        wait_for(lambda: "w3" in view.nodes, 0.5)
        etcd.stop()
        wait_for(lambda: not view.watching and view.view()["stale"], 2)
        assert [n["id"] for n in view.view()["nodes"] if not n.get("expired")] == ["w3"]
        etcd.start()
        wait_for(lambda: view.watching and not view.view()["stale"], 10)
        store.deregister("w3", "hmac:node-c")
        wait_for(lambda: "w3" not in view.nodes, 0.5)
    finally:
        if etcd.proc.poll() is not None:
            etcd.start()
        view.release()
    assert not [t for t in threading.enumerate() if t.name.startswith("shardserve-registry")]
    embedded = Directory(EmbeddedRegistry(tmp_path / "r.sqlite"), TTL, 0.1).acquire()
    try:
        assert not embedded.watching and \
            [t.name for t in embedded._threads.values()] == ["shardserve-registry"]
    finally:
        embedded.release()


@pytest.mark.parametrize("kind", ["embedded", "etcd"])
def test_closing_the_runtime_stops_the_registry_threads(request, kind, tmp_path):
    """A pool executor holds its directory's threads (poll, and the etcd watch) while its
    model is loaded; closing the runtime (dev server stop, gunicorn worker exit, a test)
    stops them, as stopping an agent stops its heartbeat and link-probe threads."""
    from plugins.registry.agent import RegistrationAgent
    from plugins.registry.settings import parse

    def ours() -> list:
        return sorted(t.name for t in threading.enumerate()
                      if t.name.startswith("shardserve-regist") or t.name.endswith("probe"))

    before = ours()
    url = request.getfixturevalue("etcd").url if kind == "etcd" else None
    config = registry_config(kind, url, tmp_path)
    front = Runtime.from_config({"repository": {"path": str(front_repo(tmp_path / "f"))},
                                 **config}).start()
    expected = ["shardserve-registry"] + (["shardserve-registry-watch"] if url else [])
    assert sorted(set(ours()) - set(before)) == expected
    front.close()
    assert ours() == before
    agent = RegistrationAgent(parse({"enabled": True, "probe_s": 0.1}), tmp_path / "f",
                              f"http://127.0.0.1:{free_port()}", "gone").start()
    assert {"shardserve-registration", "shardserve-link-probe"} <= set(ours())
    started = time.monotonic()
    agent.stop()
    assert ours() == before and time.monotonic() - started < TTL


# --------------------------------------------------------------------------- lifecycle


class FakeServer:
    """A loopback HTTP server: every POST, PUT or DELETE (its body read) goes to
    ``handle(request)``."""

    def __init__(self):
        import http.server

        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.handle(self)

            do_POST = do_PUT = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeEtcd(FakeServer):
    """An etcd gateway that answers a range read at revision 7 and a watch: ``silent``
    (created, then nothing, the socket left open: a host gone without a reset) or ``list``
    (created, then a JSON line that is not an object)."""

    def __init__(self, mode: str):
        self.mode, self.watches, self.release = mode, 0, threading.Event()
        super().__init__()

    def handle(self, request):
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        if request.path != "/v3/watch":
            body = json.dumps({"header": {"revision": "7"}, "kvs": []}).encode()
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
            return
        self.watches += 1
        request.end_headers()
        request.wfile.write(b'{"result": {"created": true}}\n')
        request.wfile.flush()
        if self.mode == "list":
            request.wfile.write(b"[1]\n")
            return
        self.release.wait(30)

    def close(self):
        self.release.set()
        super().close()


def test_a_silent_watch_stream_is_reopened_and_the_read_age_grows(caplog):
    """A stream that stops sending without closing (etcd's host dead, packets dropped) ends
    after ttl_s of silence and is reopened from a fresh read, quietly; read_age_s is the
    time since the last read or event, never a constant 0 while "watching"."""
    from plugins.registry.directory import Directory
    from plugins.registry.stores import EtcdRegistry, EtcdWatch

    fake = FakeEtcd("silent")
    view = Directory(EtcdRegistry([fake.url], "/f/"), 2.0, 60.0).acquire()
    try:
        wait_for(lambda: view.watching, 2)
        time.sleep(1.0)
        assert 0.8 <= view.view()["read_age_s"] < 2.0 and fake.watches == 1
        wait_for(lambda: fake.watches >= 2, 3)  # reopened after 2 s of silence
        assert view.view()["read_age_s"] < 1.0 and not view.view()["stale"]
        assert "watch ended" not in caplog.text
    finally:
        view.release()
        fake.close()
    listed = FakeEtcd("list")
    try:  # a line that is JSON but not an object ends the stream as a clear failure
        with pytest.raises(ServiceUnavailable):
            list(EtcdWatch(listed.url, "/f/nodes/", 8, 2.0, 2.0).events())
        with pytest.raises(ValueError):
            EtcdWatch(listed.url, "/f/nodes/", 0, 2.0)  # never from revision 0 (or 1)
    finally:
        listed.close()


class FakeStore:
    """A store with revisions and a watch whose streams do what ``behaviour`` says."""

    def __init__(self, behaviour: str, revision: int = 5):
        self.behaviour, self.revision, self.opened = behaviour, revision, []
        self.records: list = []

    def snapshot(self):
        return list(self.records), self.revision

    def open_watch(self, start_revision, idle_s=None):
        self.opened.append(start_revision)
        return FakeStream(self.behaviour)


class FakeStream:
    def __init__(self, behaviour: str):
        self.behaviour, self.closed = behaviour, threading.Event()

    def events(self):
        if self.behaviour == "cancelled":
            raise ServiceUnavailable("cancelled")
        if self.behaviour == "crash":
            raise AttributeError("'list' object has no attribute 'get'")
        self.closed.wait(30)
        return
        yield

    def close(self):
        self.closed.set()


def _registry_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("shardserve-registry")]


def test_concurrent_first_acquires_start_one_poll_and_one_watch_thread():
    """Many first requests at once (a forked gthread worker) start one set of threads; a
    watch whose stream raises anything lives on; release then acquire starts one new set,
    and an acquire between a last release's decision and its close keeps them running."""
    from plugins.registry.directory import Directory

    before = _registry_threads()
    store = FakeStore("crash")
    view = Directory(store, 60.0, 60.0)
    barrier = threading.Barrier(8)

    def first_request():
        barrier.wait()
        view.acquire()

    callers = [threading.Thread(target=first_request) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    try:
        mine = [t for t in _registry_threads() if t not in before]
        assert sorted(t.name for t in mine) == ["shardserve-registry",
                                                "shardserve-registry-watch"]
        wait_for(lambda: len(store.opened) >= 2, 2)  # the crashing stream was retried ...
        assert view._threads["watch"].is_alive()  # ... by the same, living thread
        view.acquire()
        assert [t for t in _registry_threads() if t not in before] == mine
        # release's last-holder decision, then an acquire, then release's close: kept
        for _ in range(8):
            view.release()
        with view._lock:
            view._holders -= 1
        view.acquire()
        view.close(unless_held=True)
        assert all(t.is_alive() for t in mine)
    finally:
        while view._holders:
            view.release()
    assert _registry_threads() == before


def test_a_watch_cancelled_at_once_backs_off_and_logs_once(caplog):
    """A watch that opens and is cancelled at once is no recovery: the back-off grows
    (not ~10 opens a second), "watch ended" is logged once; a store without a revision is
    not watched from revision 1; a watch starts after the newest revision seen."""
    import logging

    from plugins.registry.directory import Directory

    caplog.set_level(logging.INFO, "shardserve.registry")
    store = FakeStore("cancelled")
    view = Directory(store, 60.0, 60.0).acquire()
    try:
        time.sleep(1.6)
    finally:
        view.release()
    assert 3 <= len(store.opened) <= 6, store.opened  # 0.1 + 0.2 + 0.4 + 0.8 s pauses
    assert caplog.text.count("watch ended") == 1
    assert store.opened[0] == 6
    unrevisioned = FakeStore("cancelled", revision=0)
    view = Directory(unrevisioned, 60.0, 60.0)
    view.revision = 9
    view.acquire()
    try:
        time.sleep(0.3)
        assert unrevisioned.opened == []
        unrevisioned.revision = 3  # behind the view: the watch starts after 9
        wait_for(lambda: unrevisioned.opened, 2)
        assert unrevisioned.opened[0] == 10
    finally:
        view.release()


def test_a_watched_record_is_validated_as_a_read_one_is():
    """A pushed record without an id, with another node's id or a non-numeric heartbeat is
    ignored (the registry view and every pool: call keep working)."""
    from plugins.registry.directory import Directory

    store = FakeStore("idle")
    store.records = [{"id": "ok", "heartbeat": time.time()}, {"url": "x"},
                     {"id": "bad", "heartbeat": "soon"}]
    view = Directory(store, 60.0, 60.0)
    assert view.refresh() == 5 and list(view.nodes) == ["ok"]
    view.apply("n1", {"url": "http://x"}, 6)
    view.apply("n2", {"id": "n2", "heartbeat": "later"}, 7)
    view.apply("n3", {"id": "other", "heartbeat": 1.0}, 8)
    view.apply("n4", {"id": "n4", "heartbeat": time.time(), "url": "http://d"}, 9)
    assert [n["id"] for n in view.view()["nodes"]] == ["n4", "ok"] and view.revision == 9


def test_a_forked_child_starts_its_own_threads_and_leaves_the_parents_stream():
    """After a fork the child has no stream, threads or held locks of its parent: closing
    there does not shut the parent's watch socket; acquiring starts the child's own."""
    from plugins.registry.directory import Directory

    store = FakeStore("idle")
    view = Directory(store, 60.0, 60.0).acquire()
    try:
        wait_for(lambda: view.watching, 2)
        stream = view._stream
        view._lock.acquire()  # held by a parent thread at the fork
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no logging; only the exit status speaks
            signal.alarm(10)  # a lock inherited held would hang it: die instead
            ok = view._stream is None and not view.watching and not view._threads
            view.close()
            ok = ok and view._lock.acquire(timeout=1)
            view._lock.release()
            ok = ok and view.acquire()._threads["watch"].is_alive()
            os._exit(0 if ok else 1)
        view._lock.release()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not stream.closed.is_set() and view.watching
    finally:
        view.release()


class FakeEndpoint(FakeServer):
    """A registration route that records every call and answers ``status``."""

    def __init__(self):
        self.calls: list = []
        self.status = 200
        super().__init__()

    def handle(self, request):
        self.calls.append((request.command, time.monotonic()))
        request.send_response(self.status)
        request.send_header("Content-Length", "0")
        request.end_headers()


def test_a_failed_change_beat_waits_for_the_cadence_and_no_put_follows_the_delete(tmp_path):
    """A models change whose heartbeat fails is not re-sent every second (the next periodic
    beat, ttl_s / 3 later, carries it); a beat started after stop() sends nothing, so a
    stopping node's DELETE is never followed by a PUT that registers it again."""
    from plugins.registry import agent as agent_module
    from plugins.registry.settings import parse

    endpoint = FakeEndpoint()
    agent = agent_module.RegistrationAgent(
        parse({"enabled": True, "ttl_s": 30, "endpoint": endpoint.url}), tmp_path, "http://a:1",
        "a")
    models = [[]]
    agent.served = lambda full=True: (models[0], None)
    try:
        agent.start()
        wait_for(lambda: endpoint.calls, 2)
        endpoint.status = 503
        models[0] = [{"name": "m", "version": "1"}]
        since = time.monotonic()
        time.sleep(2.6)  # CHECK_S = 1: two more checks see the change
        assert [c[0] for c in endpoint.calls if c[1] > since] == ["PUT"]
        with agent._send_lock:  # a beat in flight at a gunicorn worker's fork
            pid = os.fork()
        if pid == 0:  # the worker leaves through the master's `finally: agent.stop()`
            signal.alarm(10)
            agent.stop()  # neither waits on the copied lock nor deregisters the node
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "DELETE" not in [c[0] for c in endpoint.calls]
    finally:
        agent.stop()
        endpoint.close()
    assert endpoint.calls[-1][0] == "DELETE"
    assert agent.beat(([], None)) == 0 and endpoint.calls[-1][0] == "DELETE"


def test_the_per_second_check_reads_only_the_loaded_models_gauge(tmp_path, monkeypatch):
    """Multi-process metrics: the check between beats merges only the live gauge files
    (not every worker's histograms), and nothing collects this process's registry in
    vain; a full read (a periodic beat) merges all of them."""
    from prometheus_client import REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    from plugins.registry.agent import served_metrics

    for name in (f"gauge_livemax_{os.getpid()}.db", "histogram_1.db", "counter_1.db"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    merged: list = []
    monkeypatch.setattr(MultiProcessCollector, "merge",
                        staticmethod(lambda files, accumulate=True: merged.append(
                            sorted(Path(f).name for f in files)) or []))

    def collect():
        raise AssertionError("the process registry was collected")

    monkeypatch.setattr(REGISTRY, "collect", collect)
    assert served_metrics(full=False) == (set(), {"count": 0.0, "sum_us": 0.0,
                                                  "queue_us": 0.0})
    served_metrics(full=True)
    assert merged == [[f"gauge_livemax_{os.getpid()}.db"],
                      ["counter_1.db", f"gauge_livemax_{os.getpid()}.db", "histogram_1.db"]]


def test_the_agent_loads_what_its_threads_need_before_they_start(tmp_path):
    """gunicorn forks its workers right after the master's agent starts: a module a master
    thread is importing at that moment stays locked in the worker for good. The idna codec
    (the first connection to a host name loads it) must be loaded before any thread runs."""
    script = f"""
import sys, threading
from pathlib import Path
from plugins.registry.agent import RegistrationAgent
from plugins.registry.settings import parse
assert "encodings.idna" not in sys.modules
threading.Thread.start = lambda self: None  # nothing may import on the agent's behalf
RegistrationAgent(parse({{"enabled": True, "probe_s": 0.1}}), Path({str(tmp_path)!r}),
                  "http://127.0.0.1:9", "n").start()
print("encodings.idna" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
