"""Deployable functions: `npx serverless package` builds self-contained zips (run here by a bare
``python -I -S`` with only the unzipped package on sys.path, and by `serverless offline`), the
250 MiB limit is enforced, numba gets a container image, and SnapStart copies re-seed."""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import ALL_EXAMPLES, EXAMPLE_MODELS, EXAMPLES, ROOT, example_inputs
from test_serverless_offline import SERVERLESS, free_port

from handlers.codec import decode_response, encode_request

# the interpreter under the venv: no site-packages of the venv, wheels built for its Python
BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
RUNTIME = f"python{sys.version_info[0]}.{sys.version_info[1]}"
# the wheels run here, not on Lambda: this machine's glibc decides which manylinux tags fit
LOCAL_GLIBC = platform.libc_ver()[1] or "2.28"
SLS_ENV = {"SLS_TELEMETRY_DISABLED": "1", "SLS_NOTIFICATIONS_MODE": "off",
           "SLS_DEPRECATION_DISABLE": "*", "CI": "true"}

RUN_PACKAGE = r"""
import base64, json, sys
root = sys.argv[1]
sys.path.insert(0, root)
from handlers.lambda_handler import get_runtime, handler
answers = []
for event in json.load(sys.stdin):
    answers.append(handler(event, None))
outside = sorted({m.split(".")[0] for m, mod in list(sys.modules.items())
                  if getattr(mod, "__file__", None) and "site-packages" in mod.__file__})
plugins = [name for name, _ in get_runtime().pm.list_name_plugin()]
print(json.dumps({"answers": answers, "outside": outside, "path": sys.path, "plugins": plugins}))
"""


def v2_event(name: str, body: bytes, headers: dict, binary: bool) -> dict:
    return {"version": "2.0", "rawPath": f"/v2/models/{name}/versions/1/infer",
            "rawQueryString": "", "requestContext": {"http": {"method": "POST"}},
            "headers": {k.lower(): v for k, v in headers.items()},
            "body": base64.b64encode(body).decode() if binary else body.decode(),
            "isBase64Encoded": binary}


def lambda_outputs(answer: dict) -> dict[str, np.ndarray]:
    raw = base64.b64decode(answer["body"]) if answer["isBase64Encoded"] else \
        answer["body"].encode()
    length = answer["headers"].get("Inference-Header-Content-Length")
    return decode_response(raw, int(length) if length else None).outputs


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """`npx serverless package` (which runs `shardserve package`) for the local Python."""
    if not SERVERLESS.exists():
        pytest.fail("node_modules is missing: run `make test`, which runs `npm ci`")
    out = tmp_path_factory.mktemp("lambda")
    env = {**os.environ, **SLS_ENV, "SHARDSERVE_LAMBDA_RUNTIME": RUNTIME,
           "SHARDSERVE_LAMBDA_GLIBC": LOCAL_GLIBC, "SHARDSERVE_PACKAGE_OUT": str(out),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    env.pop("SHARDSERVE_REPOSITORY", None)
    done = subprocess.run([str(SERVERLESS), "package", "--package", str(out / "sls")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout + done.stderr


@pytest.mark.slow
def test_serverless_package_prints_sizes_under_the_limit(packaged):
    out, printed = packaged
    for function in ("infer", "shard"):
        match = re.search(rf"^{function}: unzipped ([\d.]+) MiB of Lambda's 250.0 MiB limit",
                          printed, re.M)
        assert match, printed
        with zipfile.ZipFile(out / f"{function}.zip") as zf:
            unzipped = sum(i.file_size for i in zf.infolist())
            names = zf.namelist()
        assert abs(unzipped / 2**20 - float(match[1])) < 0.1
        assert unzipped < 250 * 2**20
        # trimmed: no tests, headers; no build-time or dev dependencies
        assert not [n for n in names if n.endswith(".h") or "/tests/" in n]
        # bytecode for this Python, unchecked-hash (a zip loses source times), none stale
        tag = f"cpython-{sys.version_info[0]}{sys.version_info[1]}"
        pycs = [n for n in names if n.endswith(".pyc")]
        assert "runtime/__pycache__/core." + tag + ".pyc" in pycs
        assert all(f".{tag}." in n for n in pycs)
        sources = {n for n in names if n.endswith(".py")}
        assert all(n.replace("__pycache__/", "").replace(f".{tag}.pyc", ".py") in sources
                   for n in pycs)
        with zipfile.ZipFile(out / f"{function}.zip") as zf:
            header = zf.read(f"runtime/__pycache__/core.{tag}.pyc")[:8]
        assert int.from_bytes(header[4:8], "little") == 0b01  # hash-based, never checked
        tops = {n.split("/")[0] for n in names}
        assert {"onnxruntime", "numpy", "pluggy", "orjson", "runtime", "handlers"} <= tops
        assert not tops & {"onnx", "numba", "llvmlite", "flask", "dask", "torch", "bin"}
    template = json.loads((out / "sls" / "cloudformation-template-update-stack.json").read_text())
    infer = template["Resources"]["InferLambdaFunction"]["Properties"]
    assert infer["Runtime"] == RUNTIME and infer["Code"]["S3Key"].endswith("/infer.zip")
    if sys.version_info >= (3, 12):
        assert infer["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    else:  # serverless.yml asks for SnapStart; this runtime has none, so it is off, loudly
        assert "SnapStart" not in infer
        assert f"function infer: SnapStart switched off: runtime {RUNTIME}" in printed


@pytest.mark.slow
@pytest.mark.parametrize("function", ["infer", "shard"])
def test_packaged_handler_runs_alone_and_answers_as_the_dev_server(packaged, tmp_path,
                                                                   example_server, function):
    out, _ = packaged
    with zipfile.ZipFile(out / f"{function}.zip") as zf:
        zf.extractall(tmp_path)
    events, wanted = [], []
    for name in EXAMPLE_MODELS:
        for binary in (False, True):
            inputs = example_inputs(name, batch=2, seed=3)
            body, headers = encode_request(inputs, binary=binary, binary_outputs=binary)
            headers["Content-Type"] = "application/octet-stream" if binary else \
                "application/json"
            events.append(v2_event(name, body, headers, binary))
            resp = requests.post(f"{example_server.base}/v2/models/{name}/versions/1/infer",
                                 data=body, headers=headers, timeout=60)
            assert resp.status_code == 200, resp.text
            length = resp.headers.get("Inference-Header-Content-Length")
            wanted.append(decode_response(resp.content, int(length) if length else None).outputs)
    env = {"SHARDSERVE_REPOSITORY": "examples/models", "SHARDSERVE_LOG_LEVEL": "WARNING",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(BASE_PYTHON), "-I", "-S", "-c", RUN_PACKAGE, str(tmp_path)],
                          input=json.dumps(events), capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["outside"] == []  # nothing from any site-packages
    # only the plugins its models use (all four examples: the language model's generation
    # plugin and the executors it uses, none of plans, numba, registry, security off)
    from plugins.packaging.selection import function_plugins

    listed = json.loads((tmp_path / "plugins" / "packaged.json").read_text())
    assert listed["load"] == list(function_plugins(EXAMPLES, list(ALL_EXAMPLES)))
    assert sorted(result["plugins"]) == sorted(listed["load"])
    assert "plugins.registry" in listed["left_out"] and "plugins.generation" in listed["load"]
    assert not [p for p in result["path"] if "site-packages" in p or ".venv" in p]
    for answer, want in zip(result["answers"], wanted):
        assert answer["statusCode"] == 200, answer
        got = lambda_outputs(answer)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.slow
def test_serverless_offline_runs_the_packaged_artifact(packaged, tmp_path):
    """The unzipped artifact is the service directory; the `python3` serverless-offline spawns
    is the bare interpreter with no site-packages, so only the package's code can answer."""
    out, _ = packaged
    service = tmp_path / "service"
    with zipfile.ZipFile(out / "infer.zip") as zf:
        zf.extractall(service)
    assert not (service / "serverless.yml").exists()
    shutil.copy(ROOT / "serverless.yml", service)
    shutil.copytree(ROOT / "deploy", service / "deploy")
    (service / "node_modules").symlink_to(ROOT / "node_modules")
    shim = tmp_path / "bin"
    shim.mkdir()
    spawned = tmp_path / "spawned.log"
    (shim / "python3").write_text(f"#!/bin/sh\necho \"$PWD\" >> {spawned}\n"
                                  f"exec {BASE_PYTHON} -I -S \"$@\"\n")
    (shim / "python3").chmod(0o755)
    http_port, lambda_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH",
                                                            "SHARDSERVE_REPOSITORY")}
    env.update(SLS_ENV, SHARDSERVE_LAMBDA_RUNTIME=RUNTIME, SHARDSERVE_LOG_LEVEL="WARNING",
               PATH=f"{shim}{os.pathsep}{env['PATH']}")
    log = open(tmp_path / "offline.log", "w+b")
    proc = subprocess.Popen(
        [str(SERVERLESS), "offline", "--host", "127.0.0.1", "--httpPort", str(http_port),
         "--lambdaPort", str(lambda_port), "--noSponsor"], cwd=service, env=env,
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                requests.get(base + "/v2/health/live", timeout=30)
                break
            except requests.ConnectionError:
                time.sleep(0.3)
        inputs = example_inputs("digits_mlp", batch=2, seed=4)
        body, headers = encode_request(inputs, binary=True, binary_outputs=True)
        headers["Content-Type"] = "application/octet-stream"
        resp = requests.post(base + "/v2/models/digits_mlp/infer", data=body, headers=headers,
                             timeout=60)
        log.flush()
        log.seek(0)
        assert resp.status_code == 200, (resp.text, log.read()[-2000:])
        length = int(resp.headers["Inference-Header-Content-Length"])
        got = decode_response(resp.content, length).outputs["probabilities"]
        import onnxruntime as ort

        sess = ort.InferenceSession(str(EXAMPLES / "digits_mlp" / "1" / "model.onnx"))
        np.testing.assert_allclose(got, sess.run(None, inputs)[0], rtol=1e-6, atol=1e-6)
        assert spawned.read_text().split() == [str(service)]  # the shim, from the package
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()



SNAPSTART_CHECK = r"""
const Plugin = require(process.argv[1]);
const warnings = [];
const service = {provider: {runtime: process.argv[2]},
                 functions: {infer: {snapStart: true},
                             shard: {snapStart: true, runtime: 'python3.13'}, plain: {}}};
const plugin = new Plugin({service, cli: {}}, {}, {log: {warning: (m) => warnings.push(m)}});
plugin.hooks.initialize();
console.log(JSON.stringify({functions: service.functions, warnings}));
"""


@pytest.mark.parametrize("runtime", ["python3.11", "python3.12"])
def test_snapstart_is_switched_off_loudly_on_a_python_without_it(runtime):
    """serverless.yml's runtime comes from SHARDSERVE_LAMBDA_RUNTIME; SnapStart needs
    python3.12+, so on python3.11 the deploy plugin drops it (saying so) rather than leave a
    stack that CloudFormation refuses at deploy time; a function's own runtime counts."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: the serverless tooling needs it (`make test` runs npm ci)")
    plugin = ROOT / "deploy" / "shardserve-package.js"
    done = subprocess.run([node, "-e", SNAPSTART_CHECK, str(plugin), runtime],
                          capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    assert result["functions"]["shard"] == {"snapStart": True, "runtime": "python3.13"}
    assert result["functions"]["plain"] == {}
    if runtime == "python3.12":
        assert result["functions"]["infer"] == {"snapStart": True} and not result["warnings"]
    else:
        assert result["functions"]["infer"] == {}
        assert result["warnings"] == [
            "function infer: SnapStart switched off: runtime python3.11 has no SnapStart "
            "(python3.12 or later); set provider.runtime (SHARDSERVE_LAMBDA_RUNTIME) to "
            "python3.12+ to keep it"]


def test_bytecode_interpreter_is_one_that_runs_that_python(tmp_path, monkeypatch, caplog):
    """A pyenv shim of an unselected version is on PATH but fails, and a pythonX.Y may be
    another Python: neither compiles the package's bytecode; a pyenv install or
    SHARDSERVE_LAMBDA_PYTHON that really is that Python does (python3.12 packages built on a
    3.11 machine shipped without bytecode, compiling every module at every cold start)."""
    from plugins.packaging.build import interpreter

    def script(path: Path, body: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
        return path

    shims = tmp_path / "shims"
    script(shims / "python3.98", "exit 127")  # pyenv: command not found
    script(shims / "python3.97", f'exec {sys.executable} "$@"')  # answers this Python's version
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    monkeypatch.delenv("SHARDSERVE_LAMBDA_PYTHON", raising=False)
    assert interpreter("3.98") is None and interpreter("3.97") is None
    installed = script(tmp_path / "pyenv" / "versions" / "3.97.2" / "bin" / "python3.97",
                       "echo 3.97")
    assert interpreter("3.97") == str(installed)
    for release in ("3.97.9", "3.97.10", "3.97.11rc1"):  # the newest release, by number
        newest = script(tmp_path / "pyenv" / "versions" / release / "bin" / "python3.97",
                        "echo 3.97")
    assert interpreter("3.97") == str(newest.parents[2] / "3.97.10" / "bin" / "python3.97")
    chosen = script(tmp_path / "elsewhere" / "python", "echo 3.97")
    monkeypatch.setenv("SHARDSERVE_LAMBDA_PYTHON", str(chosen))
    assert interpreter("3.97") == str(chosen)
    assert interpreter(f"{sys.version_info[0]}.{sys.version_info[1]}") == sys.executable
    monkeypatch.setenv("SHARDSERVE_LAMBDA_PYTHON", str(shims / "python3.97"))  # another Python
    with caplog.at_level(logging.WARNING, logger="shardserve.packaging"):
        assert interpreter("3.97").endswith("/3.97.10/bin/python3.97")
    assert [r.getMessage() for r in caplog.records] == [
        f"SHARDSERVE_LAMBDA_PYTHON={shims / 'python3.97'} does not run as Python 3.97: not "
        "used to compile the package's bytecode"]

# Over the limit, numba, needs ------------------------------------------------------------


def test_needs_follow_the_models(tmp_path):
    from plugins.packaging.build import platform_tags
    from plugins.packaging.command import python_version
    from plugins.packaging.needs import function_needs
    from runtime.errors import ConfigError

    assert python_version("python3.12") == "3.12"
    with pytest.raises(ConfigError, match="python3.12"):
        python_version("python2; rm -rf /")
    # python3.11's Amazon Linux 2 has glibc 2.26: no manylinux_2_28 wheel may ship there
    assert platform_tags("x86_64", 26)[-1] == "manylinux_2_26_x86_64"
    assert "manylinux_2_34_aarch64" in platform_tags("arm64", 34)

    needs = function_needs(EXAMPLES, ["digits_mlp"])
    assert needs.requirements() == ["pluggy", "numpy", "orjson", "onnxruntime"]
    assert not needs.container
    repo = tmp_path / "models"
    shutil.copytree(EXAMPLES / "digits_mlp", repo / "kern")
    toml = repo / "kern" / "model.toml"
    toml.write_text(toml.read_text().replace('backend = "onnxruntime"', 'backend = "numba"'))
    needs = function_needs(repo, None)
    assert needs.container and needs.features["numba"] == "kern"
    with pytest.raises(ConfigError, match="not in the repository"):
        function_needs(repo, ["../etc"])


def test_numba_function_gets_a_container_image(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(EXAMPLES / "digits_mlp", repo / "kern")
    toml = repo / "kern" / "model.toml"
    toml.write_text(toml.read_text().replace('backend = "onnxruntime"', 'backend = "numba"'))
    done = subprocess.run([sys.executable, "-m", "handlers.cli", "package", "kern=kern",
                           "--repository", str(repo), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "container image definition" in done.stdout
    dockerfile = (tmp_path / "out" / "kern.Dockerfile").read_text()
    assert "FROM public.ecr.aws/lambda/python:3.12" in dockerfile
    assert "warmup" in dockerfile and "NUMBA_CACHE_DIR=/opt/shardserve/numba-cache" in dockerfile
    assert 'CMD ["handlers.lambda_handler.handler"]' in dockerfile
    reqs = (tmp_path / "out" / "kern.requirements.txt").read_text().split()
    assert any(r.startswith("numba==") for r in reqs) and any(r.startswith("llvmlite==")
                                                              for r in reqs)
    assert not (tmp_path / "out" / "kern.zip").exists()


@pytest.mark.slow
def test_package_over_the_limit_is_refused_naming_the_biggest(tmp_path, monkeypatch, capsys):
    from plugins.packaging import build, command

    monkeypatch.setattr(command, "LAMBDA_UNZIPPED_LIMIT", 20 * 2**20)
    monkeypatch.setenv("SHARDSERVE_LAMBDA_GLIBC", LOCAL_GLIBC)
    status = command.package_function("infer", ["digits_mlp"], EXAMPLES, RUNTIME, "x86_64",
                                      tmp_path, [])
    printed = capsys.readouterr().out
    assert status == 1
    assert "over Lambda's unzipped limit" in printed
    biggest = re.search(r"biggest: (\w+) [\d.]+ MiB, (\w+)", printed)
    assert biggest and {biggest[1], biggest[2]} == {"onnxruntime", "numpy"}, printed
    assert not (tmp_path / "infer.zip").exists()
    assert (tmp_path / "infer.Dockerfile").exists()  # the way out
    assert build.LAMBDA_UNZIPPED_LIMIT == 262_144_000


# SnapStart ------------------------------------------------------------------------------

SNAPSTART = textwrap.dedent(r"""
    import json, os, random, sys
    hooks = []
    fake = type(sys)("snapshot_restore_py")  # the Lambda runtime's module, as it behaves there
    fake.register_after_restore = lambda fn, *a, **k: hooks.append(fn)
    sys.modules["snapshot_restore_py"] = fake
    from handlers import lambda_handler  # AWS_LAMBDA_INITIALIZATION_TYPE=snap-start: init now
    import numpy as np
    from plugins.generation.sampling import SamplingParams, sample
    from plugins.security.tensor_encryption import TensorEncryption
    from handlers.routes import request_id
    assert lambda_handler._runtime is not None and hooks, "not initialised for the snapshot"
    loaded = sorted(m["name"] for m in lambda_handler._runtime.models() if m["state"] == "READY")
    cipher = TensorEncryption(b"k" * 32)
    logits = np.zeros(50000, np.float32)
    sample(logits.copy(), SamplingParams(), None, use_numba=False)  # a warm-up at init
    run_hooks = sys.argv[1] == "hook"
    snapshot_random = random.getstate()
    pipes = []
    for _ in range(4):  # restored copies of one snapshot
        read, write = os.pipe()
        if os.fork() == 0:
            os.close(read)
            # fork re-seeds Python's random in the child (os.register_at_fork); a restore
            # does not: the memory comes back exactly as snapshotted
            random.setstate(snapshot_random)
            if run_hooks:
                for fn in hooks:
                    fn()
            ctx = {"request_id": request_id(), "shard": "s0", "tensor": "x"}
            out = {"nonces": [cipher.encode(b"tensor", ctx)[1:13].hex() for _ in range(3)],
                   "sampled": [sample(logits.copy(), SamplingParams(), None, use_numba=False)
                               for _ in range(3)],
                   "random": random.random(), "request_id": ctx["request_id"]}
            os.write(write, json.dumps(out).encode())
            os._exit(0)
        os.close(write)
        pipes.append(read)
    copies = []
    for read in pipes:
        copies.append(json.loads(os.read(read, 65536)))
        os.wait()
    print(json.dumps({"loaded": loaded, "copies": copies}))
""")


def snapstart_copies(mode: str) -> dict:
    env = {**os.environ, "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start",
           "SHARDSERVE_REPOSITORY": str(EXAMPLES), "SHARDSERVE_LOAD": "lazy",
           "SHARDSERVE_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-c", SNAPSTART, mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_snapstart_restored_copies_never_repeat_after_the_hook():
    result = snapstart_copies("hook")
    assert result["loaded"] == list(ALL_EXAMPLES)  # loaded before the snapshot
    copies = result["copies"]
    nonces = [n for c in copies for n in c["nonces"]]
    assert len(set(nonces)) == len(nonces) == 12
    assert len({json.dumps(c["sampled"]) for c in copies}) == len(copies)
    assert len({c["random"] for c in copies}) == len(copies)
    assert len({c["request_id"] for c in copies}) == len(copies)


def test_snapstart_without_the_hook_the_copies_repeat_their_random_state():
    """What a snapshot really shares: user-space RNG state drawn from at init (the sampler's
    numpy fallback after a warm-up, Python's random). AES-GCM nonces and request ids come
    from the kernel per message and differ even without the hook; the hook renews the rest."""
    copies = snapstart_copies("none")["copies"]
    assert len({json.dumps(c["sampled"]) for c in copies}) == 1  # every copy samples alike
    assert len({c["random"] for c in copies}) == 1
    nonces = [n for c in copies for n in c["nonces"]]
    assert len(set(nonces)) == len(nonces)  # os.urandom per message: never shared


def test_needs_see_pool_placements_bf16_graphs_and_encrypted_transforms(tmp_path):
    """A zip must carry urllib3 for pool: shards, ml_dtypes for a bfloat16 graph whatever
    model.toml says, and cryptography when the server's transforms name aes-gcm."""
    import onnx
    from onnx import TensorProto, helper

    from plugins.packaging.needs import function_needs
    from runtime.config import load_config

    repo = tmp_path / "models"
    (repo / "split" / "1").mkdir(parents=True)
    (repo / "split" / "model.toml").write_text('backend = "onnxruntime"\n')
    (repo / "split" / "1" / "plan.toml").write_text(
        '[[shards]]\nname = "s0"\nfile = "s0.onnx"\nplacement = "pool:cloud"\n')
    bf16 = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])]))
    (repo / "half" / "1").mkdir(parents=True)
    (repo / "half" / "model.toml").write_text('backend = "onnxruntime"\n')
    onnx.save(bf16, str(repo / "half" / "1" / "model.onnx"))

    needs = function_needs(repo, ["split"])
    assert needs.features == {"onnxruntime": "split", "http": "split"}
    assert "urllib3" in needs.requirements()
    needs = function_needs(repo, ["half"])
    assert needs.features == {"onnxruntime": "half", "bf16": "half"}
    assert "ml_dtypes" in needs.requirements()
    config = load_config({"repository": {"path": str(repo)},
                          "executors": {"transforms": ["zlib", "aes-gcm"]}})
    needs = function_needs(repo, ["split"], config)
    assert needs.features["cryptography"] == "[executors] transforms"
    assert "cryptography" not in function_needs(repo, ["split"], load_config(
        {"repository": {"path": str(repo)}})).features
