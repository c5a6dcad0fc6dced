"""``model.toml.json``: ``shardserve package`` writes each model's parsed model.toml beside it,
and the function's repository reads that instead of importing tomllib (a millisecond of every
cold start), only while it holds the exact model.toml text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.packaging.build import copy_models, write_parsed_config
from runtime.errors import ModelLoadError
from runtime.repository import PARSED_CONFIG_FILE, ModelRepository

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
FIRST_CONFIG = """
import sys
from runtime.repository import ModelRepository
config = ModelRepository(sys.argv[1]).config("digits_mlp")
print(config.max_batch_size, "tomllib" in sys.modules)
"""


def test_packaged_models_carry_their_parsed_config(tmp_path):
    names = sorted(p.name for p in EXAMPLES.iterdir() if (p / "model.toml").is_file())
    copy_models(EXAMPLES, names, tmp_path, "models")
    packaged, source = ModelRepository(tmp_path / "models"), ModelRepository(EXAMPLES)
    for name in names:
        assert (tmp_path / "models" / name / PARSED_CONFIG_FILE).is_file()
        assert packaged.config(name) == source.config(name)
    assert not list(EXAMPLES.glob(f"*/{PARSED_CONFIG_FILE}"))  # the source tree gets none


def test_a_packaged_model_loads_its_config_without_tomllib(tmp_path):
    copy_models(EXAMPLES, ["digits_mlp"], tmp_path, "models")
    for repository, imported in ((tmp_path / "models", "False"), (EXAMPLES, "True")):
        out = subprocess.run([sys.executable, "-c", FIRST_CONFIG, str(repository)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["64", imported]


def test_a_stale_or_broken_parsed_config_is_ignored(tmp_path):
    copy_models(EXAMPLES, ["digits_mlp"], tmp_path, "models")
    model = tmp_path / "models" / "digits_mlp"
    toml, parsed = model / "model.toml", model / PARSED_CONFIG_FILE
    toml.write_text(toml.read_text().replace("max_batch_size = 64", "max_batch_size = 8"))
    repository = ModelRepository(tmp_path / "models")
    assert repository.config("digits_mlp").max_batch_size == 8  # edited after: model.toml wins
    for broken in ("{not json", "[]", json.dumps({"toml": toml.read_text(), "table": [1]})):
        parsed.write_text(broken)
        assert repository.config("digits_mlp").max_batch_size == 8
    toml.write_text("max_batch_size = [\n")
    with pytest.raises(ModelLoadError, match="not valid TOML"):
        repository.config("digits_mlp")


@pytest.mark.parametrize("text", ["built = 1979-05-27T07:32:00Z\n", "scale = nan\n",
                                  "max_batch_size = [\n"])
def test_no_parsed_config_for_what_json_cannot_carry_or_invalid_toml(tmp_path, text):
    (tmp_path / "model.toml").write_text(text)
    assert not write_parsed_config(tmp_path)
    assert not (tmp_path / PARSED_CONFIG_FILE).exists()
