"""The generation API on every edge: the official ``openai`` client and ``curl -N`` against a
real gunicorn server in a subprocess, Flask's test client, and the Lambda handler."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import requests
from conftest import ServerProcess
from generation_models import cached_export, repository_with

from runtime import Runtime

PROMPT = "def main("


@pytest.fixture(scope="module")
def lm_repo(tmp_path_factory):
    folder = cached_export("gpt2")[0]
    root = tmp_path_factory.mktemp("lmrepo")
    return repository_with(root, {"tiny-gpt2": folder},
                           {"tiny-gpt2": "[generation]\nmax_tokens_cap = 40\n"})


@pytest.fixture(scope="module")
def expected(lm_repo):
    """Greedy answers computed in process, to compare every edge with."""
    rt = Runtime.from_config({"repository": {"path": str(lm_repo)}}).start()
    model = rt.get_model("tiny-gpt2").backend
    keys = {"max_tokens", "temperature"}
    out = {"completion": model.complete(model.parse({"max_tokens": 12, "temperature": 0},
                                                    PROMPT, keys))}
    chat_prompt = model.codec.render_chat([{"role": "user", "content": "hi"}])
    out["chat"] = model.complete(model.parse({"max_tokens": 12, "temperature": 0},
                                             chat_prompt, keys))
    rt.close()
    return out


@pytest.fixture(scope="module")
def server(lm_repo):
    proc = ServerProcess(["serve", "--repository", str(lm_repo)])
    yield proc
    proc.stop()


@pytest.mark.slow
def test_openai_client_completions_and_chat(server, expected):
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-gpt2"]
    assert client.models.retrieve("tiny-gpt2").id == "tiny-gpt2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("absent")

    done = client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=12,
                                     temperature=0)
    want = expected["completion"]
    assert done.choices[0].text == want["text"] and want["text"]
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens == want["prompt_tokens"]

    chunks = list(client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == "length"

    chat = client.chat.completions.create(model="tiny-gpt2", max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == expected["chat"]["text"]
    assert chat.usage.total_tokens == expected["chat"]["prompt_tokens"] + 12
    stream = client.chat.completions.create(
        model="tiny-gpt2", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}])
    pieces = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == \
        expected["chat"]["text"]
    assert pieces[-1].usage.completion_tokens == 12

    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-gpt2", prompt="x", max_tokens=41)
    assert "cap of 40" in bad.value.message
    assert bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-gpt2", prompt="x", temperature=7)


@pytest.mark.slow
def test_oip_generate_and_curl_generate_stream(server, expected):
    url = f"{server.base}/v2/models/tiny-gpt2/generate"
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 12, "temperature": 0}}
    answer = requests.post(url, json=body, timeout=30)
    assert answer.status_code == 200
    data = answer.json()
    assert data["text_output"] == expected["completion"]["text"]
    assert data["details"]["finish_reason"] == "length" and data["model_version"] == "1"

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run([curl, "-sN", "-H", "Content-Type: application/json", "-d",
                          json.dumps(body), url + "_stream"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    events = [json.loads(line[len("data: "):]) for line in out.split("\n\n") if line]
    assert events[-1]["done"] is True and events[-1]["details"]["completion_tokens"] == 12
    assert "".join(e["text_output"] for e in events) == expected["completion"]["text"]
    assert all(e["done"] is False for e in events[:-1]) and len(events) > 2

    for bad, status in ((b"{", 400), (b'{"text_input": "x", "nonsense": 1}', 400),
                        (b'{"text_input": "x", "parameters": {"top_p": 2}}', 400)):
        r = requests.post(url, data=bad, timeout=10)
        assert r.status_code == status and "error" in r.json()
    r = requests.post(f"{server.base}/v2/models/missing/generate", json=body, timeout=10)
    assert r.status_code == 404
    metrics = requests.get(f"{server.base}/metrics", timeout=10).text
    for family in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                   "queue_duration_seconds_count", "completion_tokens_total"):
        line = next(m for m in metrics.splitlines()
                    if m.startswith(f"shardserve_generation_{family}{{")
                    and 'model="tiny-gpt2"' in m)
        assert float(line.rsplit(" ", 1)[1]) >= 2, line


def test_flask_streams_and_shapes_openai_errors(lm_repo, expected):
    from handlers.flask_app import create_app

    app = create_app({"repository": {"path": str(lm_repo)}})
    client = app.test_client()
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 12, "temperature": 0}}
    response = client.post("/v2/models/tiny-gpt2/generate_stream", json=body, buffered=False)
    assert response.status_code == 200 and response.is_streamed
    assert response.headers["Content-Type"].startswith("text/event-stream")
    text = b"".join(response.response).decode()
    events = [json.loads(chunk[6:]) for chunk in text.split("\n\n") if chunk]
    assert "".join(e["text_output"] for e in events) == expected["completion"]["text"]
    bad = client.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "x", "n": 2})
    assert bad.status_code == 400
    assert bad.get_json()["error"]["message"] == "'n' = 2 is not supported"


def test_lambda_handler_generates_whole_answers(lm_repo, expected, monkeypatch):
    from test_lambda_handler import http_api_event

    from handlers import lambda_handler

    monkeypatch.setenv("SHARDSERVE_REPOSITORY", str(lm_repo))
    monkeypatch.delenv("SHARDSERVE_LOAD", raising=False)
    monkeypatch.setattr(lambda_handler, "_runtime", None)
    body = json.dumps({"text_input": PROMPT,
                       "parameters": {"max_tokens": 12, "temperature": 0}}).encode()
    result = lambda_handler.handler(http_api_event("POST", "/v2/models/tiny-gpt2/generate", body))
    assert result["statusCode"] == 200
    assert json.loads(result["body"])["text_output"] == expected["completion"]["text"]
    streamed = lambda_handler.handler(
        http_api_event("POST", "/v2/models/tiny-gpt2/generate_stream", body))
    assert streamed["statusCode"] == 200 and streamed["body"].count("data: ") > 2
    lambda_handler._runtime = None


def test_a_client_that_goes_away_frees_its_slot(lm_repo):
    from prometheus_client import REGISTRY

    from handlers.flask_app import create_app

    app = create_app({"repository": {"path": str(lm_repo)}})
    client = app.test_client()
    engine = app.extensions["shardserve"].get_model("tiny-gpt2").backend.engine

    def cancelled():
        return REGISTRY.get_sample_value("shardserve_generation_sequences_total",
                                         {"model": "tiny-gpt2", "version": "1",
                                          "finish_reason": "cancelled"}) or 0

    before = cancelled()
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 40, "temperature": 0}}
    response = client.post("/v2/models/tiny-gpt2/generate_stream", json=body, buffered=False)
    chunks = iter(response.response)
    assert next(chunks).startswith(b"data: ")
    response.close()  # what the WSGI server does when the socket is gone
    assert cancelled() == before + 1
    for _ in range(200):
        if not engine._batch:
            break
        time.sleep(0.005)
    assert not engine._batch and engine._cache.rows == 0


def test_chat_templates_render_in_a_sandbox(lm_repo, tmp_path):
    from plugins.generation.text import TextCodec
    from runtime.errors import BadRequest

    folder = lm_repo / "tiny-gpt2" / "1"
    hostile = {"chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(hostile))
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    codec = TextCodec(lambda name: (tmp_path / name).read_bytes(), "m",
                      {"tokenizer.json", "tokenizer_config.json"})
    with pytest.raises(BadRequest, match="SecurityError"):
        codec.render_chat([{"role": "user", "content": "hi"}])
    huge = {"chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx"
                             "{% endfor %}{% endfor %}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(huge))
    codec = TextCodec(lambda name: (tmp_path / name).read_bytes(), "m",
                      {"tokenizer.json", "tokenizer_config.json"})
    with pytest.raises(BadRequest, match="too long"):  # stops at 1 M characters, not at OOM
        codec.render_chat([{"role": "user", "content": "hi"}])
    mutate = {"chat_template": "{% set _ = messages.append(1) %}x"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(mutate))
    codec = TextCodec(lambda name: (tmp_path / name).read_bytes(), "m",
                      {"tokenizer.json", "tokenizer_config.json"})
    with pytest.raises(BadRequest, match="SecurityError"):
        codec.render_chat([{"role": "user", "content": "hi"}])


def test_a_stream_is_audited_when_it_ends_with_its_real_size(lm_repo):
    from handlers.flask_app import create_app
    from runtime import hookimpl

    class Recorder:
        events: list = []

        @hookimpl
        def shardserve_audit(self, event):
            self.events.append(event)

    recorder = Recorder()
    rt = Runtime.from_config({"repository": {"path": str(lm_repo)}}, plugins=(recorder,))
    client = create_app(rt).test_client()
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 8, "temperature": 0}}
    response = client.post("/v2/models/tiny-gpt2/generate_stream", json=body, buffered=False)
    assert not [e for e in recorder.events if e["action"] == "generate"]  # not yet: streaming
    data = b"".join(response.response)
    response.close()
    (event,) = [e for e in recorder.events if e["action"] == "generate"]
    assert event["bytes_out"] == len(data) > 0 and event["outcome"] == 200
    assert event["model"] == "tiny-gpt2"
    client.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "x", "max_tokens": 2})
    assert recorder.events[-1]["model"] == "tiny-gpt2"  # named in the body, audited all the same


@pytest.mark.slow
def test_generate_routes_under_serverless_offline(lm_repo, expected, tmp_path, monkeypatch):
    """serverless.yml's routes for text generation, through the real ``serverless offline``."""
    from test_serverless_offline import OfflineService

    monkeypatch.setenv("SHARDSERVE_REPOSITORY", str(lm_repo))
    service = OfflineService(tmp_path / "offline.log")
    try:
        body = {"text_input": PROMPT, "parameters": {"max_tokens": 12, "temperature": 0}}
        r = requests.post(service.base + "/v2/models/tiny-gpt2/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["text_output"] == expected["completion"]["text"]
        r = requests.post(service.base + "/v1/completions", timeout=60,
                          json={"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 12,
                                "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected["completion"]["text"]
        r = requests.post(service.base + "/v1/completions", timeout=60,
                          json={"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 99})
        assert r.status_code == 400 and "cap of 40" in r.json()["error"]["message"]
    finally:
        service.stop()


def _dispatch(rt, method, path, body=b"", headers=None):
    from handlers.routes import HttpRequest, dispatch

    response = dispatch(rt, HttpRequest(method, path, headers or {}, body))
    data = b"".join(response.stream) if response.stream is not None else response.body
    return response.status, data


GEN = "/v2/models/tiny-gpt2/generate"
HOSTILE = [
    (GEN, b"", 400, "JSON object"),
    (GEN, b"[1]", 400, "JSON object"),
    (GEN, b'{"parameters": {}}', 400, "text_input"),
    (GEN, b'{"text_input": 5}', 400, "prompt must be a string"),
    (GEN, b'{"text_input": "x", "parameters": []}', 400, "parameters"),
    (GEN, b'{"text_input": "x", "parameters": {"max_tokens": 1e9}}', 400, "max_tokens"),
    (GEN, b'{"text_input": "x", "parameters": {"max_tokens": 41}}', 400, "cap of 40"),
    (GEN, b'{"text_input": "x", "parameters": {"temperature": NaN}}', 400, "temperature"),
    (GEN, b'{"text_input": "x", "parameters": {"top_k": -1}}', 400, "top_k"),
    (GEN, b'{"text_input": "x", "parameters": {"stop": "a", "logprobs": 3}}', 400, "logprobs"),
    (GEN, b'{"text_input": "x", "parameters": {"stop": ["a", 3]}}', 400, "stop"),
    (GEN, b'{"text_input": "' + b"word " * 300 + b'"}', 400, "context of 256 tokens"),
    ("/v2/models/tiny-gpt2/generate_stream", b'{"text_input": ""}', 400, "prompt is empty"),
    ("/v1/completions", b'{"prompt": "x"}', 400, "'model' is required"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": ["a", "b"]}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "x", "stream": "yes"}', 400,
     "stream"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "x", "frequency_penalty": 1}', 400,
     "repetition_penalty"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "x", "tools": []}', 400, "tools"),
    ("/v1/chat/completions", b'{"model": "tiny-gpt2", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-gpt2", "messages": [{"role": "user"}]}', 400,
     "content"),
    ("/v1/chat/completions", b'{"model": "tiny-gpt2", "messages": [{"role": "user", '
     b'"content": [{"type": "image_url"}]}]}', 400, "text content"),
    ("/v1/chat/completions", b'{"model": "../etc", "messages": [{"role": "u", "content": "x"}]}',
     400, "invalid model name"),
    ("/v1/completions", b'{"model": "absent", "prompt": "x"}', 404, "unknown model"),
]


@pytest.mark.parametrize("path,body,status,words", HOSTILE)
def test_hostile_generation_requests_get_clear_4xx(lm_repo, path, body, status, words):
    rt = _hostile_runtime(lm_repo)
    got, data = _dispatch(rt, "POST", path, body)
    error = json.loads(data)["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert got == status and words in message, message
    assert "Traceback" not in message and str(lm_repo) not in message


_runtimes: dict = {}


def _hostile_runtime(lm_repo):
    if str(lm_repo) not in _runtimes:
        _runtimes[str(lm_repo)] = Runtime.from_config({"repository": {"path": str(lm_repo)},
                                                       "metrics": {"enabled": False}}).start()
    return _runtimes[str(lm_repo)]


def test_generate_is_an_action_granted_per_model(lm_repo, tmp_path):
    from plugins.security.apikeys import KeyStore

    keys = KeyStore(tmp_path / "keys.json")
    _, reader = keys.create("reader", ["tiny-gpt2"], ["infer", "metadata"])
    _, writer = keys.create("writer", ["tiny-gpt2"], ["generate", "metadata"])
    _, other = keys.create("other", ["somebody-else"], ["generate"])
    rt = Runtime.from_config({"repository": {"path": str(lm_repo)},
                              "security": {"enabled": True, "keys_file": str(keys.path)}}).start()
    oip = json.dumps({"text_input": PROMPT, "parameters": {"max_tokens": 3}}).encode()
    openai_body = json.dumps({"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 3}).encode()
    assert _dispatch(rt, "POST", GEN, oip)[0] == 401
    assert _dispatch(rt, "POST", GEN, oip, {"x-api-key": reader})[0] == 403
    assert _dispatch(rt, "POST", GEN, oip, {"x-api-key": writer})[0] == 200
    assert _dispatch(rt, "POST", "/v1/completions", openai_body, {"x-api-key": writer})[0] == 200
    status, data = _dispatch(rt, "POST", "/v1/completions", openai_body, {"x-api-key": other})
    assert status == 403 and json.loads(data)["error"]["type"] == "permission_error"
    status, data = _dispatch(rt, "POST", "/v1/completions", openai_body)
    assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"


def test_generate_command_streams_to_stdout(lm_repo, expected):
    from conftest import SHARDSERVE

    done = subprocess.run([str(SHARDSERVE), "generate", "tiny-gpt2", PROMPT, "-r", str(lm_repo),
                           "--max-tokens", "12", "--temperature", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected["completion"]["text"] + "\n"
    assert "[length: " in done.stderr
    bad = subprocess.run([str(SHARDSERVE), "generate", "tiny-gpt2", "x", "-r", str(lm_repo),
                          "--top-p", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().endswith("'top_p' must be a number > 0.0 "
                                                               "and <= 1.0")


@pytest.mark.slow
def test_gunicorn_sends_events_as_they_are_made(server):
    """Not buffered: the first event arrives long before the last one."""
    url = f"{server.base}/v2/models/tiny-gpt2/generate_stream"
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 40, "temperature": 0}}
    gaps = []
    for _ in range(3):
        start = time.perf_counter()
        with requests.post(url, json=body, stream=True, timeout=30) as r:
            times = [time.perf_counter() - start for line in r.iter_lines(chunk_size=1) if line]
        gaps.append((times[0], times[-1], len(times)))
    first, last, count = min(gaps, key=lambda g: g[0] / g[1])
    assert count > 10 and first < 0.5 * last, gaps


def test_a_signed_language_model_loads_and_a_swapped_tokenizer_does_not(lm_repo, tmp_path):
    """tokenizer.json and the chat template are model files like model.onnx: they go through
    the model-bytes hooks, so signing covers them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from plugins.security.model_signing import sign_directory

    root = tmp_path / "signed"
    shutil.copytree(lm_repo, root)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    sign_directory(root / "tiny-gpt2" / "1", key)
    security = {"require_signed": True, "trusted_keys": [str(tmp_path / "pub.pem")]}
    rt = Runtime.from_config({"repository": {"path": str(root)}, "security": security}).start()
    assert rt.models()[0]["state"] == "READY"
    config = root / "tiny-gpt2" / "1" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("<|", "<"))  # a swapped chat template
    rt = Runtime.from_config({"repository": {"path": str(root)}, "security": security}).start()
    state = rt.models()[0]
    assert state["state"] == "UNAVAILABLE" and "tokenizer_config.json" in state["reason"]
