"""Crash safety of the CLI tools that write files (issue 15, items 4, 5, 11): each tool is
killed with SIGKILL at seeded random points, at least 20 times, then rerun; the rerun must
complete, every model must load and answer, every printed key must work and nothing
half-written may remain.

Kill points are delays drawn from a seeded generator, scaled by one uninterrupted run's
duration measured on a scratch copy, so they land mid-work on a fast or a slow machine.
Resumable tools (encrypt, rotate) are killed in a chain on one repository: every run
resumes what the killed one left, the hardest case for idempotency.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARDSERVE, add_model, write_model

from handlers.routes import HttpRequest, dispatch
from plugins.security import model_encryption as enc
from plugins.security.apikeys import KeyStore
from runtime import Runtime
from runtime.errors import Unauthorized

KILLS = 20
X = [1.0, 2.0, 3.0, 4.0]


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(name.encode()) + 15)


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def _run(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = subprocess.run([str(SHARDSERVE), *args], env=env, capture_output=True, text=True,
                         timeout=120)
    return out, time.monotonic() - started


def _killed(args: list[str], env: dict, delay: float) -> tuple[int | None, str]:
    """Run, SIGKILL after ``delay`` seconds; (exit code if it finished first, stdout)."""
    proc = subprocess.Popen([str(SHARDSERVE), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        proc.wait(delay)
        finished = proc.returncode
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        finished = None
    out = proc.communicate(timeout=60)[0]
    return finished, out


def _leftovers(root: Path) -> list[str]:
    """Temp files and staging directories a killed writer may leave."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith((".optimize-", ".partition-")))


def _serves(repo: Path, models: list[str], expected: list[float], security: dict | None = None,
            policy_all: bool = False) -> None:
    """Every model (every version with ``policy_all``) loads and answers ``expected`` to
    the input ``X``."""
    if policy_all:
        for name in models:
            config = repo / name / "model.toml"
            old = config.read_text() if config.exists() else ""
            config.write_text('version_policy = "all"\n' + old)  # before any [table]
    rt = Runtime.from_config({"repository": {"path": str(repo)},
                              "security": security or {}}).start()
    states = {m["name"]: m for m in rt.models()}
    assert all(states[n]["state"] == "READY" for n in models), [
        (n, states[n].get("reason")) for n in models if states[n]["state"] != "READY"]
    for name in models:
        versions = sorted(int(p.name) for p in (repo / name).iterdir() if p.name.isdigit())
        for version in versions if policy_all else [None]:
            path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
            body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                           "shape": [1, len(X)], "data": X}]}).encode()
            resp = dispatch(rt, HttpRequest("POST", path, {}, body))
            assert resp.status == 200, (name, version, resp.body[:200])
            got = json.loads(resp.body)["outputs"][0]["data"]
            assert np.allclose(got, expected, atol=1e-5), (name, version)
    rt.close()


# encrypt and rotate ---------------------------------------------------------


def _many_models(root: Path, n: int) -> list[str]:
    model = add_model()
    names = [f"m{i:03d}" for i in range(n)]
    for name in names:
        write_model(root / name / "1" / "model.onnx", model)
    return names


DOUBLED = [v + v for v in X]


def _key_file(path: Path, key: bytes) -> Path:
    path.write_bytes(base64.b64encode(key))
    return path


def _kill_chain(name: str, args: list[str], repo: Path, progress) -> int:
    """Kill ``shardserve <args>`` at seeded delays until it was killed KILLS times, each
    run resuming what the killed one left. ``progress()`` checks the repository after
    each kill and returns the fraction done; when a run finished everything, the
    repository is restored to its start, so later kills land mid-work again. Delays span
    one uninterrupted run (measured first) and shrink when runs finish before their kill
    (a machine faster than at calibration). Returns the kills that left work part-done."""
    pristine = repo.with_name(repo.name + "-pristine")
    shutil.copytree(repo, pristine)

    def reset() -> None:
        shutil.rmtree(repo)
        shutil.copytree(pristine, repo)

    full, t_full = _run(args, _env())
    assert full.returncode == 0, full.stdout[-500:]
    _, t_idle = _run(args, _env())  # nothing left to do: the interpreter and the scan
    reset()
    rng, kills, partial, scale = _rng(name), 0, 0, 1.0
    for _ in range(3 * KILLS):
        if kills >= KILLS:
            break
        finished, _ = _killed(args, _env(), scale * rng.uniform(0.8 * t_idle, 1.1 * t_full))
        done = progress()
        kills += finished is None
        partial += finished is None and 0 < done < 1
        if finished is not None:
            scale *= 0.85
        if done == 1:
            reset()
    assert kills >= KILLS, kills
    return partial


@pytest.mark.slow
def test_encrypt_killed_20_times_then_rerun_encrypts_everything(tmp_path):
    master = secrets.token_bytes(32)
    key_file = _key_file(tmp_path / "master.key", master)
    repo = tmp_path / "models"
    names = _many_models(repo, 30)
    plain = (repo / names[0] / "1" / "model.onnx").read_bytes()
    args = ["encrypt", str(repo), "--master-key-file", str(key_file), "--chunk-size", "64"]

    def progress() -> float:
        done = 0
        for name in names:  # every file is the plaintext or opens with the master key
            path = repo / name / "1" / "model.onnx"
            if path.read_bytes() != plain:
                assert enc.is_encrypted(path) and enc.opens_with(enc.dek_path(path), master)
                done += 1
        return done / len(names)

    assert _kill_chain("encrypt", args, repo, progress) >= 3
    rerun, _ = _run(args, _env())
    assert rerun.returncode == 0, rerun.stdout
    assert not _leftovers(repo)
    assert all(enc.is_encrypted(repo / n / "1" / "model.onnx") for n in names)
    _serves(repo, names, DOUBLED, {"require_encrypted": True, "master_key_file": str(key_file)})


@pytest.mark.slow
def test_rotate_killed_20_times_then_rerun_completes_and_old_key_is_not_needed(tmp_path):
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    old_file, new_file = _key_file(tmp_path / "old.key", old), _key_file(tmp_path / "new.key", new)
    repo = tmp_path / "models"
    # a rotation re-wraps one small data key per model (fast): enough models that the work,
    # not the interpreter's start, spans most of a run, so kills land mid-rotation
    names = _many_models(repo, 160)
    for name in names:
        enc.encrypt_file(repo / name / "1" / "model.onnx", old, chunk_size=64)
    args = ["rotate", str(repo), "--old-key-file", str(old_file), "--new-key-file", str(new_file)]

    def progress() -> float:
        done = 0
        for name in names:  # every data key opens with one of the two, never neither
            dek = repo / name / "1" / "model.onnx.dek"
            done += enc.opens_with(dek, new)
            assert enc.opens_with(dek, new) or enc.opens_with(dek, old), name
        return done / len(names)

    assert _kill_chain("rotate", args, repo, progress) >= 3
    split = sum(enc.opens_with(repo / n / "1" / "model.onnx.dek", new) for n in names)
    if 0 < split < len(names) and enc.rotation_journal(repo).exists():
        third = _key_file(tmp_path / "third.key", secrets.token_bytes(32))
        refused, _ = _run(["rotate", str(repo), "--old-key-file", str(old_file),
                           "--new-key-file", str(third)], _env())
        assert refused.returncode == 1 and "pending" in refused.stdout
    rerun, _ = _run(args, _env())
    assert rerun.returncode == 0 and "rotation complete" in rerun.stdout, rerun.stdout[-500:]
    assert not enc.rotation_journal(repo).exists() and not _leftovers(repo)
    old_file.unlink()  # the docs' advice once rotation is complete
    _serves(repo, names, DOUBLED, {"require_encrypted": True, "master_key_file": str(new_file)})


# keys create / revoke -------------------------------------------------------


@pytest.mark.slow
def test_keys_create_and_revoke_killed_20_times_every_printed_key_works(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    # Many keys make reading, changing and saving the file a good part of each run, so the
    # kills land inside it, not only in the interpreter's start.
    store.save({f"{i:08x}": {"name": "filler", "salt": "00" * 16, "hash": "00" * 32,
                             "models": ["*"], "actions": ["infer"]} for i in range(1000)})
    create = ["keys", "--keys-file", str(path), "create"]
    full, t_full = _run([*create, "calibration", "--models", "*"], _env())
    assert full.returncode == 0
    printed: dict[str, str] = {}  # key id -> key, printed by a create
    revoked, maybe_revoked = set(), set()
    rng, kills, scale = _rng("keys"), 0, 1.0
    for i in range(4 * KILLS):
        if kills >= KILLS:
            break
        # one create and one revoke in six run to the end: keys to revoke, and revocations
        # that were confirmed; the rest are killed at delays that shrink when runs finish
        full = i % 6 in (0, 3)
        delay = 60.0 if full else scale * rng.uniform(0.5 * t_full, 1.05 * t_full)
        alive = sorted(printed.keys() - revoked - maybe_revoked)
        if i % 2 and alive:
            victim = alive[int(rng.integers(len(alive)))]
            finished, out = _killed(["keys", "--keys-file", str(path), "revoke", victim], _env(),
                                    delay)
            (revoked if f"revoked {victim}" in out else maybe_revoked).add(victim)
        else:
            finished, out = _killed([*create, f"user{i}", "--models", "*"], _env(), delay)
            lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
            key = lines.get("API key (shown once, store it now)")
            if key:
                printed[lines["key id"]] = key
        kills += finished is None
        if finished is not None and not full:
            scale *= 0.85
        keys = store.read()  # never a corrupt file, whatever the kill point
        assert not revoked & set(keys), (i, revoked & set(keys))
        assert all(k in keys for k in printed.keys() - revoked - maybe_revoked), i
    assert kills >= KILLS, kills
    rerun, _ = _run([*create, "last", "--models", "*"], _env())
    assert rerun.returncode == 0, rerun.stderr[-500:]
    assert not _leftovers(tmp_path), _leftovers(tmp_path)
    for key_id, key in printed.items():
        if key_id in revoked:
            with pytest.raises(Unauthorized):
                store.check(key)
        elif key_id not in maybe_revoked:
            assert store.check(key)["name"].startswith("user")
    assert len(printed) >= 4 and revoked, (len(printed), revoked, maybe_revoked)


# optimize and partition -----------------------------------------------------


def _chain_model(n: int = 12, width: int = 4):
    """MatMul+Relu x n with positive weights: enough nodes for several shards, tiny files."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(n):
        w = rng.uniform(0.1, 0.5, (width, width)).astype(np.float32)
        weights.append(w)
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        x = f"h{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    expected = np.array([X], np.float32)
    for w in weights:
        expected = np.maximum(expected @ w, 0)
    return model, expected[0].tolist()


def _publishing_tool_survives_kills(tmp_path: Path, name: str, args: list[str],
                                    complete: str) -> Path:
    """Kill ``shardserve <args>`` at seeded points around its publish; every version that
    appears must be complete (``complete`` file present), the rerun must publish."""
    model, expected = _chain_model()
    repo = tmp_path / "models"
    write_model(repo / "m" / "1" / "model.onnx", model)
    scratch = tmp_path / "scratch"
    shutil.copytree(repo, scratch)
    timings = []
    for _ in range(2):  # the faster of two runs: the first pays for a cold file cache
        full, seconds = _run([*args, "-r", str(scratch), "m"], _env())
        assert full.returncode == 0, full.stdout + full.stderr
        timings.append(seconds)
    t_full = min(timings)
    rng, kills, scale = _rng(name), 0, 1.0
    for _ in range(3 * KILLS):
        if kills >= KILLS:
            break
        finished, _ = _killed([*args, "-r", str(repo), "m"], _env(),
                              scale * rng.uniform(0.4 * t_full, 1.0 * t_full))
        kills += finished is None
        if finished is not None:  # faster than at calibration: aim earlier
            scale *= 0.85
        for version in (p for p in (repo / "m").iterdir() if p.name.isdigit() and p.name != "1"):
            assert (version / complete).is_file(), (version.name, sorted(os.listdir(version)))
    assert kills >= KILLS, kills
    rerun, _ = _run([*args, "-r", str(repo), "m"], _env())
    assert rerun.returncode == 0, rerun.stdout[-500:] + rerun.stderr[-500:]
    assert not _leftovers(repo)
    _serves(repo, ["m"], expected, policy_all=True)
    return repo


@pytest.mark.slow
def test_optimize_killed_20_times_never_leaves_a_version_without_provenance(tmp_path):
    import tomllib

    from plugins.optimizers.pipeline import default_source
    from runtime.repository import ModelRepository

    repo = _publishing_tool_survives_kills(
        tmp_path, "optimize", ["optimize", "--with", "fold", "--latency-runs", "0",
                               "--samples", "4", "--batch", "4"], "provenance.toml")
    versions = {p.name for p in (repo / "m").iterdir() if p.name.isdigit()}
    toml = tomllib.loads((repo / "m" / "model.toml").read_text())
    assert set(toml["provenance"]) == versions - {"1"}
    assert all(r["source_version"] == 1 for r in toml["provenance"].values())
    assert default_source(ModelRepository(repo), "m", toml) == 1


@pytest.mark.slow
def test_partition_killed_20_times_publishes_whole_versions_only(tmp_path):
    _publishing_tool_survives_kills(tmp_path, "partition",
                                    ["partition", "--strategy", "pipeline", "--shards", "6",
                                     "--model-version", "1"], "plan.toml")


# the states a kill leaves, built by hand ------------------------------------


def test_rotate_resumes_refuses_a_third_key_and_never_claims_success_early(tmp_path):
    old, new, third = (secrets.token_bytes(32) for _ in range(3))
    files = {n: _key_file(tmp_path / f"{n}.key", k) for n, k in
             (("old", old), ("new", new), ("third", third))}
    repo = tmp_path / "models"
    names = _many_models(repo, 4)
    for name in names:
        enc.encrypt_file(repo / name / "1" / "model.onnx", old, chunk_size=64)
    # A rotation killed half-way: two keys rewrapped, the journal written.
    for name in names[:2]:
        enc.rotate_file(repo / name / "1" / "model.onnx.dek", old, new)
    enc.rotation_journal(repo).write_text(json.dumps({"from": enc.master_key_id(old),
                                                      "to": enc.master_key_id(new)}))

    def rotate(to: str) -> subprocess.CompletedProcess:
        return _run(["rotate", str(repo), "--old-key-file", str(files["old"]),
                     "--new-key-file", str(files[to])], _env())[0]

    refused = rotate("third")
    assert refused.returncode == 1 and "pending" in refused.stdout
    assert sum(enc.opens_with(repo / n / "1" / "model.onnx.dek", third) for n in names) == 0
    stranger = repo / "stranger" / "1" / "model.onnx"  # encrypted under neither key
    write_model(stranger, add_model())
    enc.encrypt_file(stranger, third, chunk_size=64)
    partial = rotate("new")
    assert partial.returncode == 1 and "rotation complete" not in partial.stdout
    assert partial.stdout.count("already rewrapped") == 2 and "FAILED" in partial.stdout
    assert enc.rotation_journal(repo).exists()  # still pending: keep the old key
    shutil.rmtree(repo / "stranger")
    done = rotate("new")
    assert done.returncode == 0 and "rotation complete" in done.stdout
    assert not enc.rotation_journal(repo).exists()
    assert all(enc.opens_with(repo / n / "1" / "model.onnx.dek", new) for n in names)


def test_encrypt_rerun_skips_what_is_done_and_refuses_another_masters_files(tmp_path):
    master, other = secrets.token_bytes(32), secrets.token_bytes(32)
    key_file = _key_file(tmp_path / "master.key", master)
    repo = tmp_path / "models"
    names = _many_models(repo, 3)
    enc.encrypt_file(repo / names[0] / "1" / "model.onnx", master)  # done before a kill
    (repo / names[1] / "1" / ".model.onnx.999999999-x.tmp").write_bytes(b"half")  # left
    args = ["encrypt", str(repo), "--master-key-file", str(key_file)]
    out, _ = _run(args, _env())
    assert out.returncode == 0 and out.stdout.count("already encrypted") == 1, out.stdout
    assert sum(line.startswith("encrypted ") for line in out.stdout.splitlines()) == 2
    assert not _leftovers(repo)
    foreign = write_model(repo / "x" / "1" / "model.onnx", add_model())
    enc.encrypt_file(foreign, other)
    again, _ = _run(args, _env())
    assert again.returncode == 1 and "FAILED" in again.stdout and str(repo / "x") in again.stdout


def test_a_version_published_before_a_kill_gets_its_provenance_on_the_next_run(tmp_path):
    import tomllib

    from plugins.optimizers.pipeline import default_source
    from plugins.optimizers.publish import PROVENANCE_FILE, provenance_text, recover
    from runtime.repository import ModelRepository

    model_dir = tmp_path / "models" / "m"
    write_model(model_dir / "1" / "model.onnx", add_model())
    (model_dir / "model.toml").write_text("# mine\nmax_batch_size = 8\n")
    # Killed after the rename, before model.toml was rewritten:
    write_model(model_dir / "2" / "model.onnx", add_model())
    (model_dir / "2" / PROVENANCE_FILE).write_text(
        provenance_text(2, {"source_version": 1}).lstrip())
    (model_dir / ".optimize-999999999-abc").mkdir()  # and a staging dir of a dead run
    (model_dir / ".optimize-999999999-abc" / "model.onnx").write_bytes(b"partial")
    assert ModelRepository(tmp_path / "models").versions("m") == [1, 2]
    recover(model_dir)
    text = (model_dir / "model.toml").read_text()
    assert text.startswith("# mine\nmax_batch_size = 8\n")
    raw = tomllib.loads(text)
    assert raw["provenance"] == {"2": {"source_version": 1}}
    assert default_source(ModelRepository(tmp_path / "models"), "m", raw) == 1
    assert sorted(os.listdir(model_dir)) == ["1", "2", "model.toml"]
    recover(model_dir)  # idempotent
    assert (model_dir / "model.toml").read_text() == text
