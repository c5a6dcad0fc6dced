"""Security state that must not be per process (issue 15: items 2, 5, 9, 10, 13): replay
nonces and rate limits shared by gunicorn workers and kept across a ``kill -9``; the keys
file under concurrent ``keys`` commands; empty grants; principals keyed by method."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import SHARDSERVE, ServerProcess

from handlers.routes import HttpRequest, dispatch
from plugins.security.apikeys import KeyStore
from plugins.security.hmac_signing import sign_request
from plugins.security.shared_state import SharedState
from runtime import Runtime

BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": [1, 2, 3, 4]}]}).encode()
INFER = "/v2/models/double/infer"
SECRET = b"s" * 32


def call(rt, headers, path=INFER, body=BODY):
    resp = dispatch(rt, HttpRequest("POST", path, {k.lower(): v for k, v in headers.items()},
                                    body))
    return resp.status, json.loads(resp.body)


def signed(client="alice", nonce=None):
    return sign_request(SECRET, client, "POST", INFER, BODY, nonce=nonce)


@pytest.fixture
def hmac_env(monkeypatch):
    monkeypatch.setenv("TEST_HMAC_SECRET", base64.b64encode(SECRET).decode())


def secure_runtime(repo: Path, keys: KeyStore, **security) -> Runtime:
    config = {"repository": {"path": str(repo)},
              "security": {"enabled": True, "keys_file": str(keys.path),
                           "hmac": {"clients": {"alice": {"secret_env": "TEST_HMAC_SECRET",
                                                          "models": ["double"]}}},
                           **security}}
    return Runtime.from_config(config).start()


# the shared store -----------------------------------------------------------


def test_shared_store_token_bucket_and_nonces_are_exact(tmp_path):
    store = SharedState(tmp_path / "s.sqlite")
    assert [store.take_token("k", 2, 2, 100.0) for _ in range(3)] == [0, 0, 0.5]
    assert store.take_token("other", 2, 2, 100.0) == 0  # one bucket per key
    assert store.take_token("k", 2, 2, 100.5) == 0  # refilled at the rate
    assert store.take_token("k", 2, 2, 99.0) == pytest.approx(0.5)  # clock going back: no gift
    assert store.use_nonce("c", "n1", 10, 20) and not store.use_nonce("c", "n1", 15, 25)
    assert store.use_nonce("d", "n1", 15, 25)  # nonces are per client
    assert store.use_nonce("c", "n1", 21, 31)  # forgotten once expired
    again = SharedState(tmp_path / "s.sqlite")  # another process opening the same file
    assert not again.use_nonce("c", "n1", 22, 32)
    assert again.take_token("k", 2, 2, 100.5) == pytest.approx(0.5)


def test_a_broken_store_answers_503_never_a_pass(tmp_path, caplog):
    from runtime.errors import ServiceUnavailable

    store = SharedState(tmp_path / "s.sqlite")
    store._db.close()  # what a vanished file system or a full disk looks like from here
    with pytest.raises(ServiceUnavailable) as err:
        store.use_nonce("c", "n", 1, 2)
    assert err.value.headers == {"Retry-After": "1"} and str(tmp_path) not in caplog.text
    with pytest.raises(ServiceUnavailable):
        store.take_token("k", 1, 1, 1)



def test_threads_have_their_own_connections_and_a_nonce_is_taken_once(tmp_path):
    """No Python lock serialises the store: each thread writes through its own connection
    while SQLite keeps every check atomic."""
    import threading

    store = SharedState(tmp_path / "s.sqlite")
    connections, taken, start = [], [], threading.Barrier(4)

    def worker() -> None:
        start.wait()
        connections.append(store._db)  # held: no id is reused
        taken.extend(n for n in range(50) if store.use_nonce("c", str(n), 1, 1e12))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({id(db) for db in connections + [store._db]}) == 5
    assert sorted(taken) == list(range(50))  # each nonce accepted by exactly one thread

def test_a_forked_worker_shares_the_parents_store(tmp_path):
    store = SharedState(tmp_path / "s.sqlite")
    assert store.use_nonce("c", "before-fork", 1, 1e12)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = not store.use_nonce("c", "before-fork", 2, 1e12) and store.use_nonce(
            "c", "in-child", 2, 1e12)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not store.use_nonce("c", "in-child", 3, 1e12)


def test_state_dir_setting(tmp_path, tiny_repo, monkeypatch):
    from plugins.security.shared_state import shared_state
    from runtime.config import load_config

    monkeypatch.delenv("SHARDSERVE_STATE_DIR")
    cfg = load_config({"server": {"state_dir": str(tmp_path / "state")},
                       "repository": {"path": str(tiny_repo)}})
    store = shared_state(cfg)
    assert store.path.parent == tmp_path / "state" and store.path.name.startswith("security-")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert store.path.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("SHARDSERVE_STATE_DIR", str(tmp_path / "from-env"))
    assert load_config({}).state_dir == tmp_path / "from-env"
    from plugins.security.shared_state import state_dir
    from runtime.errors import ConfigError

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "a-file"))  # cannot hold a directory
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    cfg.state_dir = None
    fallback = state_dir(cfg)
    assert fallback == tmp_path / f"shardserve-state-{os.getuid()}" and fallback.is_dir()
    if os.getuid() == 0:  # a state dir another user controls is refused, never used
        (tmp_path / "theirs").mkdir()
        os.chown(tmp_path / "theirs", 65534, -1)
        cfg.state_dir = tmp_path / "theirs"
        with pytest.raises(ConfigError, match="state_dir"):
            state_dir(cfg)


# principals -----------------------------------------------------------------


def test_empty_actions_grant_nothing(tiny_repo, tmp_path, hmac_env, monkeypatch):
    keys = KeyStore(tmp_path / "keys.json")
    _, nothing = keys.create("bob", ["double"], [])
    _, default = keys.create("carl", ["double"], ["infer"])
    monkeypatch.setenv("TEST_HMAC_NONE", base64.b64encode(b"n" * 32).decode())
    rt = secure_runtime(tiny_repo, keys, hmac={"clients": {
        "none": {"secret_env": "TEST_HMAC_NONE", "models": ["double"], "actions": []}}})
    assert call(rt, {"x-api-key": nothing})[0] == 403
    assert call(rt, {"x-api-key": default})[0] == 200
    headers = sign_request(b"n" * 32, "none", "POST", INFER, BODY)
    assert call(rt, headers)[0] == 403
    from plugins.security.settings import DEFAULT_ACTIONS, SecuritySettings

    sec = SecuritySettings(enabled=True)
    assert sec.principal("t", "jwt", ["*"], []).actions == frozenset()
    assert sec.principal("t", "jwt", ["*"], None).actions == DEFAULT_ACTIONS


def test_same_name_by_two_methods_is_two_principals(tiny_repo, tmp_path, hmac_env):
    keys = KeyStore(tmp_path / "keys.json")
    _, key = keys.create("alice", ["double"], ["infer"])
    audit = tmp_path / "audit.jsonl"
    rt = secure_runtime(tiny_repo, keys, limits={"rate": 0.001, "burst": 2},
                        audit={"path": str(audit)})
    assert [call(rt, signed())[0] for _ in range(3)] == [200, 200, 429]
    assert call(rt, {"x-api-key": key})[0] == 200  # its own bucket
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["principal"], e["outcome"]) for e in lines] == [
        ("hmac:alice", 200), ("hmac:alice", 200), ("hmac:alice", 429), ("apikey:alice", 200)]


# the keys file --------------------------------------------------------------


def test_invalid_keys_file_refuses_startup_then_503_while_serving(tiny_repo, tmp_path, hmac_env,
                                                                   caplog):
    from runtime.errors import ConfigError

    keys = KeyStore(tmp_path / "keys.json")
    _, key = keys.create("alice", ["double"], ["infer"])
    rt = secure_runtime(tiny_repo, keys)
    assert call(rt, {"x-api-key": key})[0] == 200
    keys.path.write_text('{"keys": [1, 2]}')
    status, out = call(rt, {"x-api-key": key})
    assert status == 503 and out == {"error": "API keys are unavailable on this server"}
    assert "API keys file is not valid" in caplog.text and str(tmp_path) not in caplog.text
    with pytest.raises(ConfigError, match="API keys file is not valid"):
        secure_runtime(tiny_repo, keys)


def _keys_cli(keys: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(SHARDSERVE), "keys", "--keys-file", str(keys), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_concurrent_creates_keep_every_key_and_revoked_keys_stay_revoked(tmp_path):
    path = tmp_path / "keys.json"
    procs = [_keys_cli(path, "create", f"user{i}", "--models", "*") for i in range(10)]
    printed = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ids = {line.split()[-1] for out in printed for line in out.splitlines()
           if line.startswith("key id:")}
    store = KeyStore(path)
    assert len(ids) == 10 and set(store.read()) == ids
    revoked = set()
    for victim in sorted(ids)[:3]:  # a revoke racing two creates, three rounds
        racing = [_keys_cli(path, "revoke", victim), _keys_cli(path, "create", "x", "--models",
                                                               "*"),
                  _keys_cli(path, "create", "y", "--models", "*")]
        assert all(p.wait(60) == 0 for p in racing)
        revoked.add(victim)
        assert not revoked & set(store.read())
    assert len(store.read()) == 10 - 3 + 6


def _one_writer(path: Path, results: list, i: int) -> None:
    results.append(KeyStore(path).create(f"t{i}", ["*"], ["infer"])[0])


def test_threads_in_one_process_do_not_lose_keys(tmp_path):
    path, results = tmp_path / "keys.json", []
    threads = [threading.Thread(target=_one_writer, args=(path, results, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(KeyStore(path).read()) == set(results) and len(results) == 8


# real gunicorn, two workers -------------------------------------------------


def _workers(master: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master and fields[0] != "Z":
                out.append(int(entry.name))
    return sorted(out)


def _wait_workers(master: int, n: int, old: set[int] = frozenset()) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = _workers(master)
        if len(pids) == n and not old & set(pids):
            return pids
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not bring {n} fresh workers up: {_workers(master)}")


class Only:
    """Route every new connection to one worker: the others are stopped (SIGSTOP), so only
    ``pid`` accepts."""

    def __init__(self, pid: int, others: list[int]):
        self.pid, self.others = pid, [p for p in others if p != pid]

    def __enter__(self):
        for p in self.others:
            os.kill(p, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        for p in self.others:
            os.kill(p, signal.SIGCONT)


def _post(server: ServerProcess, headers: dict) -> int:
    # A new connection per request, so the accepting worker is the one not stopped.
    r = requests.post(server.base + INFER, data=BODY, timeout=30,
                      headers={**headers, "Content-Type": "application/json",
                               "Connection": "close"})
    return r.status_code


def _ready(server: ServerProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(server.base + "/v2/health/ready", timeout=5,
                            headers={"Connection": "close"}).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError("no worker answered")


@pytest.mark.slow
def test_gunicorn_workers_share_replay_and_rate_state_across_kill_9(tiny_repo, tmp_path):
    keys = KeyStore(tmp_path / "keys.json")
    _, key = keys.create("alice", ["double"], ["infer"])
    _, flood = keys.create("flood", ["double"], ["infer"])
    config = tmp_path / "shardserve.toml"
    config.write_text(f"""
[repository]
path = "{tiny_repo}"
[security]
enabled = true
keys_file = "{keys.path}"
[security.limits]
rate = 0.001
burst = 4
[security.hmac.clients.alice]
secret_env = "TEST_HMAC_SECRET"
models = ["double"]
[security.hmac.clients.replayed]
secret_env = "TEST_HMAC_SECRET"
models = ["double"]
""")
    server = ServerProcess(["--config", str(config), "serve", "--workers", "2"],
                           env={"TEST_HMAC_SECRET": base64.b64encode(SECRET).decode(),
                                "SHARDSERVE_STATE_DIR": str(tmp_path / "state")})
    try:
        master = server.proc.pid
        a, b = _wait_workers(master, 2)
        captured = sign_request(SECRET, "replayed", "POST", INFER, BODY)
        with Only(a, [a, b]):
            assert _post(server, captured) == 200
            assert [_post(server, signed()) for _ in range(2)] == [200, 200]
        with Only(b, [a, b]):
            assert _post(server, captured) == 401  # replayed to the other worker
            assert [_post(server, signed()) for _ in range(3)] == [200, 200, 429]
            assert _post(server, {"X-API-Key": key}) == 200  # apikey:alice: its own bucket
        for pid in (a, b):  # the attacker kills every worker; gunicorn starts fresh ones
            os.kill(pid, signal.SIGKILL)
        c, d = _wait_workers(master, 2, old={a, b})
        for fresh in (c, d):
            with Only(fresh, [c, d]):
                _ready(server)
                assert _post(server, captured) == 401
                assert _post(server, signed()) == 429
        # 40 concurrent requests of one principal over both workers' 16 threads: exactly
        # the burst passes, whatever worker and thread takes each.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: _post(server, {"X-API-Key": flood}), range(40)))
        assert sorted(statuses) == [200] * 4 + [429] * 36
        assert server.proc.poll() is None
    finally:
        log = server.stop()
    assert "Traceback" not in log
    # the refused replay is logged without its credentials: no signature, nonce or secret
    signature = captured["Authorization"].rsplit("Signature=", 1)[1]
    nonce = captured["Authorization"].split("Nonce=", 1)[1].split(",", 1)[0]
    assert signature not in log and nonce not in log
    assert base64.b64encode(SECRET).decode() not in log
