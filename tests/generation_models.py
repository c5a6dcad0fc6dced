"""Tiny language models for the generation tests, built for real.

A byte-level BPE tokenizer trained with ``tokenizers`` on Python standard-library sources, and
GPT-2- and Llama-architecture models with random weights built with ``transformers`` and exported
with optimum's ``text-generation-with-past`` exporter, unmodified: the exact files an
``optimum-cli export onnx --task text-generation-with-past`` user copies into a repository.
The initialisation is scaled up so the top-1/top-2 logit margins are far above float noise and
greedy decoding is a meaningful comparison. torch, transformers and optimum are test-time only.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sysconfig
from pathlib import Path

VOCAB = 384
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def stdlib_sources(count: int = 30) -> list[str]:
    """A fixed, offline corpus: the first ``count`` modules of this Python's standard library."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:count]


def train_tokenizer(out_dir: Path, vocab: int = VOCAB, files: list[str] | None = None) -> Path:
    """A byte-level BPE tokenizer.json (any text encodes), with ``<|endoftext|>`` as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files or stdlib_sources(), trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "bos_token": EOS, "chat_template": CHAT_TEMPLATE}))
    return path


def hf_model(arch: str, vocab: int = VOCAB, seed: int = 0, sizes: dict | None = None):
    """A random-weight ``transformers`` causal LM: ``gpt2`` (MHA, learned positions) or
    ``llama`` (GQA, RoPE), two layers, width 64, initialisation scaled for clear margins;
    ``sizes`` overrides config fields (a larger model for benchmarks)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(**{"vocab_size": vocab, "n_embd": 64, "n_layer": 2, "n_head": 4,
                            "n_positions": 256, "initializer_range": 0.2, "bos_token_id": 0,
                            "eos_token_id": 0, **(sizes or {})})
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(**{"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "max_position_embeddings": 256,
                             "initializer_range": 0.2, "bos_token_id": 0, "eos_token_id": 0,
                             "tie_word_embeddings": False, **(sizes or {})})
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def export_model(arch: str, work: Path, sizes: dict | None = None) -> tuple[Path, object]:
    """Export ``hf_model(arch, sizes=sizes)`` with optimum into ``work/<arch>/onnx``
    (model.onnx, config.json, generation_config.json, plus the tokenizer files); returns that
    folder and the torch model."""
    from optimum.exporters.onnx import main_export

    model = hf_model(arch, sizes=sizes)
    hf_dir, onnx_dir = work / arch / "hf", work / arch / "onnx"
    model.save_pretrained(hf_dir)
    main_export(str(hf_dir), output=str(onnx_dir), task="text-generation-with-past",
                device="cpu")
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(tok_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, onnx_dir / name)
    return onnx_dir, model


def repository_with(root: Path, models: dict[str, Path], toml: dict[str, str] | None = None
                    ) -> Path:
    """A model repository holding each exported folder, copied unmodified, as version 1."""
    for name, folder in models.items():
        shutil.copytree(folder, root / name / "1", dirs_exist_ok=True)
        text = (toml or {}).get(name)
        if text is not None:
            (root / name / "model.toml").write_text(text)
    return root


def stage_node(root: Path, plan_dir: Path, name: str, stage: int = 1, toml: str = "") -> Path:
    """Serve shard ``stage`` of the decoder plan in ``plan_dir`` from the repository ``root``
    as the ``decoder-stage`` model ``<name>.stage_<stage>`` (what a remote placement calls);
    ``toml`` is appended to its model.toml."""
    node = root / f"{name}.stage_{stage}"
    (node / "1").mkdir(parents=True)
    shutil.copy(plan_dir / f"shard_{stage}.onnx", node / "1" / "model.onnx")
    (node / "model.toml").write_text('task = "decoder-stage"\n' + toml)
    return node


_exports: dict[str, tuple[Path, object]] = {}
_work: list[Path] = []


def cached_export(arch: str) -> tuple[Path, object]:
    """``export_model(arch)`` once per test process (every test module shares the exports)."""
    if arch not in _exports:
        if not _work:
            import atexit
            import tempfile

            _work.append(Path(tempfile.mkdtemp(prefix="shardserve-lm-")))
            atexit.register(shutil.rmtree, _work[0], True)
        _exports[arch] = export_model(arch, _work[0])
    return _exports[arch]
