"""The example language model (examples/models/stdlib_gpt) is what the README says: small, an
unmodified optimum export with its tokenizer, a held-out perplexity that onnxruntime reproduces
from the committed files, and Python-shaped text from ``make run`` plus the README's curls."""

from __future__ import annotations

import importlib.util
import json
import math
import platform

import numpy as np
import pytest
import requests
from conftest import EXAMPLE_LM, EXAMPLES, ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FOLDER = EXAMPLES / EXAMPLE_LM
PROMPT = "def read(self, path):\n"


def training_script():
    spec = importlib.util.spec_from_file_location(
        "train_language_model", ROOT / "examples" / "train_language_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_is_small_and_complete():
    files = {p.name for p in (FOLDER / "1").iterdir()}
    assert files == {"model.onnx", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"}
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size < 30 << 20
    config = tomllib.loads((FOLDER / "model.toml").read_text())
    assert config["task"] == "text-generation" and config["generation"]["max_batch"] >= 32
    training = json.loads((FOLDER / "TRAINING.json").read_text())
    assert f"{training['held_out_perplexity']:.1f}" in config["description"]
    readme = (ROOT / "README.md").read_text()
    assert f"perplexity of {training['held_out_perplexity']:.1f}" in readme


def test_held_out_perplexity_is_reproduced_by_onnxruntime():
    """The figure in TRAINING.json (and the README), recomputed from the committed ONNX graph
    and tokenizer on the same held-out windows of this Python's standard library."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    training = json.loads((FOLDER / "TRAINING.json").read_text())
    trained_on = training["python"].rsplit(".", 1)[0]
    if platform.python_version().rsplit(".", 1)[0] != trained_on:
        pytest.skip(f"the held-out corpus is Python {trained_on}'s standard library")
    script = training_script()
    _, held_out = script.corpus()
    tok = Tokenizer.from_file(str(FOLDER / "1" / "tokenizer.json"))
    ids = script.encode(tok, held_out)
    context = training["context"]
    windows = ids[: (ids.size // context) * context].reshape(-1, context)
    windows = windows[: training["held_out_tokens"] // context]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(FOLDER / "1" / "model.onnx"), options)
    past = [a for a in session.get_inputs() if a.name.startswith("past_key_values.")]
    heads, dim = past[0].shape[1], past[0].shape[3]
    batch = 32
    losses = []
    for start in range(0, len(windows), batch):
        w = windows[start:start + batch]
        feed = {"input_ids": w, "attention_mask": np.ones_like(w),
                **{a.name: np.zeros((len(w), heads, 0, dim), np.float32) for a in past}}
        if "position_ids" in {a.name for a in session.get_inputs()}:
            feed["position_ids"] = np.broadcast_to(np.arange(context), w.shape).copy()
        logits = session.run(["logits"], feed)[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        # the mean next-token loss of each window, as the training script's model(labels=) did
        nll = -np.take_along_axis(logp[:, :-1], w[:, 1:, None], -1)[..., 0]
        losses.extend(nll.mean(1))
    ppl = math.exp(float(np.mean(losses)))
    assert ppl == pytest.approx(training["held_out_perplexity"], rel=0.01)


@pytest.mark.parametrize("route", ["generate", "completions"])
def test_make_run_and_the_readme_curls_give_python_shaped_text(example_server, route):
    """``make run`` serves examples/models: the README's requests get Python-looking text."""
    if route == "generate":
        resp = requests.post(
            f"{example_server.base}/v2/models/{EXAMPLE_LM}/generate", timeout=60,
            json={"text_input": PROMPT, "parameters": {"max_tokens": 60, "seed": 3}})
        assert resp.status_code == 200, resp.text
        text = resp.json()["text_output"]
        assert resp.json()["details"]["completion_tokens"] > 10
    else:
        resp = requests.post(f"{example_server.base}/v1/completions", timeout=60, json={
            "model": EXAMPLE_LM, "prompt": PROMPT, "max_tokens": 60, "seed": 3})
        assert resp.status_code == 200, resp.text
        text = resp.json()["choices"][0]["text"]
    lines = text.splitlines()
    assert len(lines) >= 3
    # indented lines, identifiers, Python punctuation: code-shaped, not noise
    assert sum(line.startswith("    ") for line in lines) >= 2
    assert any(word in text for word in ("self", "return", "if ", "def ", "None", "import"))
    assert sum(c in "()[]:=." for c in text) >= 5
    assert "\ufffd" not in text
