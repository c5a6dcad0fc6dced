"""Measure a candidate against its source: size, latency, accuracy; the report table.

Latency runs the two models interleaved (source, candidate, source, ...) on
this machine and takes medians, so a noisy neighbour slows both alike.
Accuracy compares outputs on the calibration (or generated) inputs: worst
max abs diff over float outputs, mean per-sample cosine similarity (worst
output), and top-1 agreement for classifier-shaped outputs ([batch, classes]
scores, or integer labels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .base import Calibration, Tolerance
from .progress import progress


@dataclass
class Report:
    size_before: int
    size_after: int
    latency_before: float | None = None  # seconds, median
    latency_after: float | None = None
    latency_batch: int = 1
    latency_level: str = "all"
    max_abs_diff: float = 0.0
    cosine: float = 1.0
    top1: float | None = None
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    def figures(self) -> dict:
        out = {"size_before": self.size_before, "size_after": self.size_after,
               "max_abs_diff": self.max_abs_diff, "cosine": self.cosine,
               "samples": self.samples}
        if self.latency_before is not None:
            out["latency_ms_before"] = round(self.latency_before * 1e3, 4)
            out["latency_ms_after"] = round(self.latency_after * 1e3, 4)
            out["latency_batch"] = self.latency_batch
            out["latency_ort_level"] = self.latency_level
        if self.top1 is not None:
            out["top1_agreement"] = self.top1
        return out

    def failures(self, budget: Tolerance) -> list[str]:
        """Budget lines this report breaks (empty: within budget)."""
        out = []
        if budget.max_abs_diff is not None and not self.max_abs_diff <= budget.max_abs_diff:
            out.append(f"max abs diff {self.max_abs_diff:.4g} > {budget.max_abs_diff:g}")
        if budget.min_cosine is not None and not self.cosine >= budget.min_cosine:
            out.append(f"cosine {self.cosine:.6f} < {budget.min_cosine:g}")
        if budget.min_top1 is not None and self.top1 is not None and self.top1 < budget.min_top1:
            out.append(f"top-1 agreement {self.top1:.2%} < {budget.min_top1:.2%}")
        return out

    def table(self, budget: Tolerance) -> str:
        def verdict(ok: bool, text: str) -> str:
            return f"{text} {'ok' if ok else 'FAILS'}"

        rows = [("", "before", "after", "")]
        ratio = self.size_before / max(self.size_after, 1)
        rows.append(("size", _bytes(self.size_before), _bytes(self.size_after),
                     f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"))
        if self.latency_before is not None:
            speed = self.latency_before / max(self.latency_after, 1e-12)
            level = "" if self.latency_level == "all" else f", ort {self.latency_level}"
            rows.append((f"latency (batch {self.latency_batch}{level}, median)",
                         f"{self.latency_before * 1e3:.3f} ms",
                         f"{self.latency_after * 1e3:.3f} ms",
                         f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"))
        b = budget
        rows.append(("max abs diff", "-", f"{self.max_abs_diff:.3g}",
                     "" if b.max_abs_diff is None else verdict(
                         self.max_abs_diff <= b.max_abs_diff, f"budget <= {b.max_abs_diff:g}")))
        rows.append(("cosine (mean per sample)", "-", f"{self.cosine:.6f}",
                     "" if b.min_cosine is None else verdict(
                         self.cosine >= b.min_cosine, f"budget >= {b.min_cosine:g}")))
        if self.top1 is not None:
            rows.append(("top-1 agreement", "-", f"{self.top1:.2%}",
                         "" if b.min_top1 is None else verdict(
                             self.top1 >= b.min_top1, f"budget >= {b.min_top1:.0%}")))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines + [f"accuracy on {self.samples} samples"] + self.notes)


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def session(model_bytes: bytes, threads: int = 1, level: str = "all") -> Any:
    """An onnxruntime CPU session as the server would build it (``level``: graph optimisation)."""
    import onnxruntime as ort

    from plugins.backends.onnxruntime import session_options

    opts = session_options("measured", {"intra_op_threads": threads, "inter_op_threads": 1,
                                        "graph_optimization_level": level})
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _is_classifier(array: Any) -> bool:
    return (array.ndim == 2 and array.dtype.kind == "f" and 1 < array.shape[1] <= 100_000) or (
        array.ndim == 1 and array.dtype.kind in "iu"
    )


def compare(source: Any, candidate: Any, calibration: Calibration) -> dict:
    """Accuracy figures of ``candidate`` against ``source`` (sessions) on every batch."""
    import numpy as np

    names = [o.name for o in source.get_outputs()]
    ref: dict[str, list] = {n: [] for n in names}
    got: dict[str, list] = {n: [] for n in names}
    bar = progress(total=len(calibration.batches), desc="evaluating", unit="batch")
    for batch in calibration.batches:
        for name, a, b in zip(names, source.run(names, batch), candidate.run(names, batch)):
            ref[name].append(a)
            got[name].append(b)
        bar.update(1)
    bar.close()
    max_abs, cosines, top1 = 0.0, [], []
    for name in names:
        a, b = np.concatenate(ref[name]), np.concatenate(got[name])
        if _is_classifier(a):
            pred_a = a if a.ndim == 1 else a.argmax(axis=1)
            pred_b = b if b.ndim == 1 else b.argmax(axis=1)
            top1.append(float(np.mean(pred_a == pred_b)))
        if a.dtype.kind != "f":
            continue
        a64 = a.astype(np.float64).reshape(len(a), -1)
        b64 = b.astype(np.float64).reshape(len(b), -1)
        if not np.isfinite(b64).all():
            max_abs, cosines = float("inf"), [*cosines, 0.0]
            continue
        max_abs = max(max_abs, float(np.max(np.abs(a64 - b64), initial=0.0)))
        norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
        same = np.all(a64 == b64, axis=1)
        cos = np.where(same, 1.0, np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-30))
        cosines.append(float(np.mean(cos)))
    return {"max_abs_diff": max_abs, "cosine": min(cosines) if cosines else 1.0,
            "top1": min(top1) if top1 else None}


def latency(source: Any, candidate: Any, feed: dict, runs: int, warmup: int = 3) -> tuple:
    """Median seconds per run of each session, interleaved."""
    import statistics

    for _ in range(warmup):
        source.run(None, feed)
        candidate.run(None, feed)
    times: tuple[list, list] = ([], [])
    bar = progress(total=runs, desc="timing", unit="run")
    for i in range(runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            sess = (source, candidate)[which]
            start = time.perf_counter()
            sess.run(None, feed)
            times[which].append(time.perf_counter() - start)
        bar.update(1)
    bar.close()
    return statistics.median(times[0]), statistics.median(times[1])
