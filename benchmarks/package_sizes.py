"""Unzipped size of each Lambda function's package against Lambda's 250 MB limit.

Builds, with ``shardserve package`` for one runtime, the functions the README lists:

- ``infer``: every example model (what serverless.yml's ``infer`` ships);
- one function per example model, the text-generation example (``stdlib_gpt``) included;
- ``front``: ``cnn_skip`` with its partitioned version (a 2-shard pipeline plan, v2);
- ``shard``: one shard of that plan as its own model (``shardserve shards export``), what a
  plan's shard function serves.

It works on a copy of examples/models (partitioning publishes a version). The wheels come
from the wheelhouse (``~/.cache/shardserve/wheels``), or the package index on first use.

    python benchmarks/package_sizes.py [--runtime python3.12] [--architecture x86_64]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
LINE = re.compile(r"^(\S+): unzipped ([\d.]+) MiB of Lambda's ([\d.]+) MiB limit .*?"
                  r"(?:zipped ([\d.]+) MiB)?\)?$", re.M)


def shardserve(*args: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "handlers.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"shardserve {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    local = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    parser.add_argument("--runtime", default=local,
                        help=f"Lambda runtime (default {local}, this Python: bytecode included)")
    parser.add_argument("--architecture", default="x86_64", choices=("x86_64", "arm64"))
    args = parser.parse_args()

    env = {**os.environ, "SHARDSERVE_LOG_LEVEL": "WARNING"}
    env.pop("SHARDSERVE_REPOSITORY", None)
    if args.runtime == local and "SHARDSERVE_LAMBDA_GLIBC" not in env:
        env["SHARDSERVE_LAMBDA_GLIBC"] = platform.libc_ver()[1] or "2.28"  # runs here too
    models = sorted(p.name for p in EXAMPLES.iterdir() if (p / "model.toml").exists())
    common = ["--runtime", args.runtime, "--architecture", args.architecture]
    printed = []
    with tempfile.TemporaryDirectory(prefix="package-sizes-") as temp:
        repository, shards, out = Path(temp) / "models", Path(temp) / "shards", Path(temp) / "out"
        shutil.copytree(EXAMPLES, repository)
        shardserve("partition", "cnn_skip", "--repository", str(repository), "--strategy",
                   "pipeline", "--shards", "2", env=env)
        shardserve("shards", "export", "cnn_skip", "--repository", str(repository),
                   "--to", str(shards), env=env)
        shard = sorted(p.name for p in shards.iterdir() if p.is_dir())[-1]
        functions = ["infer", *(f"{m}={m}" for m in models), "front=cnn_skip"]
        printed.append(shardserve("package", *functions, "--repository", str(repository),
                                  "--out", str(out), *common, env=env))
        printed.append(shardserve("package", f"shard={shard}", "--repository", str(shards),
                                  "--out", str(out), *common, env=env))
    text = "\n".join(printed)
    labels = {"infer": f"infer (all {len(models)} examples)", "front": "front (cnn_skip v1 + "
              "v2 pipeline plan)", "shard": f"shard ({shard}, one shard of that plan)"}
    print(f"{args.runtime} {args.architecture}, unzipped, against Lambda's limit of "
          "262,144,000 bytes (250 MiB):")
    for name, size, limit, zipped in LINE.findall(text):
        share = 100 * float(size) / float(limit)
        print(f"  {labels.get(name, name):<48} {float(size):7.1f} MiB  {share:4.0f}% of the "
              f"limit  zipped {zipped or '?'} MiB")


if __name__ == "__main__":
    main()
