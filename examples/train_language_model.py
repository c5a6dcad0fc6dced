"""Train the example language model: a small GPT-2 on the Python standard library's own source.

The corpus is on every machine with Python and needs no download: the top-level modules of
this interpreter's standard library, every tenth file held out for the perplexity figure. A
byte-level BPE tokenizer is trained with ``tokenizers``, the model with PyTorch (a build-only
dependency: ``shardserve[lm-dev]``), and the result is exported with optimum's
``text-generation-with-past`` exporter, unmodified, into ``examples/models/<name>/1/``:

    .venv/bin/python examples/train_language_model.py

Deterministic: seeded, one thread by default (the result is the same on every run with the
same library versions). It prints its progress every 50 steps and the held-out perplexity, and
writes model.toml and TRAINING.json beside the version. Nothing of torch is needed to serve the
result.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
EOS = "<|endoftext|>"
# Chat over a code model: each message becomes a comment, the answer starts on a fresh line.
CHAT_TEMPLATE = ("{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}{% endif %}")


MODEL_TOML = """\
# shardserve model configuration (see docs/repository.md, docs/generation.md)
# Written by examples/train_language_model.py.
description = "GPT-2 ({layers} x {width}) on Python's stdlib source, held-out perplexity {ppl:.1f}"
backend = "onnxruntime"
task = "text-generation"
[onnxruntime]
intra_op_threads = 1
[generation]
max_tokens_cap = {cap}
default_max_tokens = 64
max_batch = 32
"""


def corpus() -> tuple[list[str], list[str]]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    held_out = files[::10]
    return [f for f in files if f not in held_out], held_out


def train_tokenizer(files: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    return tok


def encode(tok, files: list[str]) -> np.ndarray:
    ids: list[int] = []
    eos = tok.token_to_id(EOS)
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            ids.extend(tok.encode(fh.read()).ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="stdlib_gpt")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, default=ROOT / "models")
    args = p.parse_args(argv)

    import torch
    from optimum.exporters.onnx import main_export
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # the machine is shared; one thread is the default
    torch.use_deterministic_algorithms(True)
    train_files, held_files = corpus()
    tok = train_tokenizer(train_files, args.vocab)
    train_ids, held_ids = encode(tok, train_files), encode(tok, held_files)
    print(f"corpus: {len(train_files)} files, {train_ids.size} tokens; held out "
          f"{len(held_files)} files, {held_ids.size} tokens")
    eos = tok.token_to_id(EOS)
    config = GPT2Config(vocab_size=args.vocab, n_positions=256, n_embd=args.width,
                        n_layer=args.layers, n_head=4, bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config)
    # The served defaults (a request may override each): light sampling, no loops on a small model.
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, do_sample=True, temperature=0.7, top_k=40,
        repetition_penalty=1.1)
    print(f"model: GPT-2, {args.layers} layers, width {args.width}, vocabulary {args.vocab}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.steps} steps of "
          f"{args.batch} x {args.context} tokens on {args.threads} thread(s)", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(0)
    warmup = max(1, args.steps // 20)
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, train_ids.size - args.context - 1, args.batch)
        batch = torch.from_numpy(np.stack([train_ids[s:s + args.context] for s in starts]))
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    model.eval()
    with torch.no_grad():  # held-out perplexity over consecutive windows
        windows = held_ids[: (held_ids.size // args.context) * args.context].reshape(
            -1, args.context)[:256]
        losses = [model(torch.from_numpy(w[None]), labels=torch.from_numpy(w[None])).loss.item()
                  for w in windows]
    ppl = math.exp(float(np.mean(losses)))
    print(f"held-out perplexity {ppl:.2f} over {windows.size} tokens "
          f"({time.perf_counter() - started:.0f} s of training)")

    target = args.out / args.name / "1"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        main_export(str(Path(tmp) / "hf"), output=str(Path(tmp) / "onnx"),
                    task="text-generation-with-past", device="cpu")
        target.mkdir(parents=True, exist_ok=True)
        for name in ("model.onnx", "config.json", "generation_config.json"):
            shutil.copy(Path(tmp) / "onnx" / name, target / name)
    tok.save(str(target / "tokenizer.json"))
    (target.parent / "model.toml").write_text(MODEL_TOML.format(
        layers=args.layers, width=args.width, ppl=ppl, cap=min(192, config.n_positions - 16)))
    (target / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "bos_token": EOS, "chat_template": CHAT_TEMPLATE}, indent=1) + "\n")
    (target.parent / "TRAINING.json").write_text(json.dumps(
        {"steps": args.steps, "batch": args.batch, "context": args.context, "vocab": args.vocab,
         "width": args.width, "layers": args.layers, "held_out_perplexity": round(ppl, 2),
         "held_out_tokens": int(windows.size), "python": platform.python_version()},
        indent=1) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
