"""benchmarks/overhead.py in this tree and in earlier commits, run after run on one machine.

Each commit is exported with ``git archive`` to a temporary directory, and the runs of every
tree alternate (this tree, REV, this tree, REV, ...), so load that comes and goes hits them
alike. Prints each run's rows, then each tree's range of the time shardserve adds per request
(``added µs``), the figure to compare between trees.

    python benchmarks/overhead_against.py 21690b7 [REV ...] [--runs 3] [--core-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def short_hash(rev: str) -> str:
    """The commit ``rev`` names, abbreviated (a directory name even for ``origin/x`` or ``@~2``)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                          check=True, capture_output=True, text=True).stdout.strip()


def export(commit: str, into: Path) -> Path:
    target = into / commit
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def run(tree: Path, options: list[str]) -> dict[str, float]:
    """``added µs`` per model of one run of ``tree``'s own benchmarks/overhead.py."""
    out = subprocess.run([sys.executable, "benchmarks/overhead.py", *options], cwd=tree,
                         env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                         text=True, check=True).stdout
    added = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[0].replace("_", "").isalpha():
            print(f"{tree.name[:12]:<12} {line}")
            added[fields[0]] = float(fields[4])
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="commits to compare with this tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--core-only", action="store_true")
    args = parser.parse_args()
    options = ["--rounds", str(args.rounds)] + (["--core-only"] if args.core_only else [])
    with tempfile.TemporaryDirectory() as scratch:
        commits = dict.fromkeys(short_hash(rev) for rev in args.revs)  # each commit once
        trees = [ROOT, *(export(commit, Path(scratch)) for commit in commits)]
        added: dict[Path, list[dict]] = {tree: [] for tree in trees}
        for _ in range(args.runs):
            for tree in trees:
                added[tree].append(run(tree, options))
    plugins = "core only" if args.core_only else "default plugins"
    print(f"\nadded µs per request ({args.runs} runs, {plugins})")
    for tree, runs in added.items():
        ranges = []
        for model in dict.fromkeys(model for r in runs for model in r):  # every run's models
            values = [r[model] for r in runs if model in r]
            missing = f" (in {len(values)} of {len(runs)} runs)" if len(values) < len(runs) else ""
            ranges.append(f"{model} {min(values):.1f}-{max(values):.1f}{missing}")
        print(f"{'this tree' if tree == ROOT else tree.name:<12} {', '.join(ranges) or 'no rows'}")


if __name__ == "__main__":
    main()
