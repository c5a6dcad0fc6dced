"""``--private`` on ``shardserve partition`` / ``shardserve plan`` (issue #23).

The flag does what ``-o private=true`` does for a language model cut edge-cloud (the
embedding, the first k layers and the LM head on the edge), on the example language model
(examples/models/stdlib_gpt: GPT-2, 4 layers, width 128); with another strategy or a model that
is not a language model it is one clear error line, and nothing is written.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import EXAMPLE_LM, EXAMPLES

from handlers.cli import main
from plugins.shard_plan import parse_plan
from runtime import Runtime


def _repository(tmp_path, *names):
    for name in names:
        shutil.copytree(EXAMPLES / name, tmp_path / "models" / name)
        if name == EXAMPLE_LM:  # serve the split beside the original (a top-level key first)
            toml = tmp_path / "models" / name / "model.toml"
            toml.write_text('version_policy = "all"\n' + toml.read_text())
    return tmp_path / "models"


def _versions(root, name):
    return sorted(p.name for p in (root / name).iterdir() if p.is_dir())


def _greedy(model, prompt, max_tokens):
    request = model.parse({"max_tokens": max_tokens, "temperature": 0}, prompt,
                          {"max_tokens", "temperature"})
    return [e["token"] for e in model.generate(request)
            if "finish_reason" not in e and e["token"] is not None]


@pytest.mark.slow
def test_private_flag_keeps_the_ends_on_the_edge_and_generates_the_same_tokens(tmp_path):
    """``--private -o cut=2`` writes the same three-stage plan as ``-o private=true``: edge
    (embedding, layers 0-1), cloud (layers 2-3), edge (final norm and LM head); served, it
    generates the unsplit version's greedy tokens."""
    root = _repository(tmp_path, EXAMPLE_LM)
    argv = ["partition", EXAMPLE_LM, "--repository", str(root), "-s", "edge-cloud"]
    assert main([*argv, "--private", "-o", "cut=2", "--edge-placement", "local"]) == 0
    assert main([*argv, "-o", "private=true", "-o", "cut=2", "--model-version", "1"]) == 0
    flag, option = (parse_plan(EXAMPLE_LM, (root / EXAMPLE_LM / v / "plan.toml").read_bytes())
                    for v in ("2", "3"))
    for plan in (flag, option):
        assert [s["layers"] for s in plan.raw["shards"]] == [[0, 1], [2, 3], []]
        assert plan.raw["decoder"]["cuts"] == [2, 4]
        assert plan.raw["options"]["private"] == "true"
    assert flag.raw["shards"][2]["outputs"][0] == "logits"  # the head is home
    rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
    try:
        whole, split = rt.get_model(EXAMPLE_LM, 1).backend, rt.get_model(EXAMPLE_LM, 2).backend
        assert [s.spec.layers for s in split.engine.stages] == [[0, 1], [2, 3], []]
        for prompt in ("def main(", "import os\n"):
            assert _greedy(split, prompt, 12) == _greedy(whole, prompt, 12), prompt
    finally:
        rt.close()


@pytest.mark.slow
def test_plan_private_flag_prices_only_private_cuts(tmp_path, capsys):
    """``shardserve plan LM -s edge-cloud --private``: the candidates are the private cuts
    (1..L-1), each sending one hidden state up and one down per token; nothing written."""
    from plugins.generation.split_planner import FRAMING_DOWN, FRAMING_UP

    root = _repository(tmp_path, EXAMPLE_LM)
    assert main(["plan", EXAMPLE_LM, "--repository", str(root), "-s", "edge-cloud",
                 "--private", "--json", "-o", "prompt_tokens=8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [r["cut"] for r in plan["candidates"]] == [1, 2, 3]
    assert {r["bytes_per_token"] for r in plan["candidates"]} == {
        2 * 128 * 4 + FRAMING_UP + FRAMING_DOWN}
    assert _versions(root, EXAMPLE_LM) == ["1"]


def test_private_flag_refuses_other_strategies_and_other_models(tmp_path, capsys):
    """One clear line, no traceback, no version: --private with pipeline (flag or option),
    a private value that is not a yes/no, and --private on a tensor model."""
    root = _repository(tmp_path, EXAMPLE_LM, "digits_mlp")
    cases = [(["partition", EXAMPLE_LM, "-s", "pipeline", "--shards", "2", "--private"],
              "--private keeps the ends of a language model on the edge: it needs "
              "--strategy edge-cloud"),
             (["partition", EXAMPLE_LM, "-s", "pipeline", "-o", "private=yes"],
              "it needs --strategy edge-cloud"),
             (["plan", EXAMPLE_LM, "-s", "pipeline", "--private"],
              "it needs --strategy edge-cloud"),
             (["partition", EXAMPLE_LM, "-s", "edge-cloud", "-o", "private=maybe"],
              "private must be true or false"),
             (["partition", "digits_mlp", "-s", "edge-cloud", "--private"],
              "--private splits a text-generation model"),
             (["plan", "digits_mlp", "-s", "edge-cloud", "--private"],
              "this model is not one")]
    for argv, words in cases:
        assert main([*argv, "--repository", str(root)]) == 1, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    for name in (EXAMPLE_LM, "digits_mlp"):
        assert _versions(root, name) == ["1"]
