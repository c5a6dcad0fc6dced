"""Post-processing kernels (numba) against their numpy implementations.

Each pair runs the same input alternately; prints the median of each and the
speed-up numpy / numba (target: >= 5x). The numba kernels run serially and,
where they have a row-parallel variant, on all numba threads too.

- softmax + top-5 over [64, 32000] logits (a language model's vocabulary);
- CTC greedy decoding of [32, 200, 80] scores (the baseline is a vectorised
  numpy decoder; the per-sequence itertools.groupby one is shown for scale);
- non-maximum suppression of 10,000 boxes (IoU 0.5);
- NHWC -> NCHW + image normalisation of [8, 224, 224, 3] (one fused pass, as
  the stages run it, and the two kernels apart).

    python benchmarks/numba_kernels.py [--rounds 30]
"""

from __future__ import annotations

import argparse

import numpy as np
from interleave import interleaved  # benchmarks/interleave.py


def np_softmax_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    e = np.exp(x - x.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    part = np.argpartition(-p, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(p, part, -1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return np.take_along_axis(values, order, -1), np.take_along_axis(part, order, -1)


def np_ctc_greedy(x: np.ndarray, blank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    best = x.argmax(-1)
    keep = best != blank
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    labels = np.full(best.shape, -1, np.int64)
    lengths = keep.sum(-1)
    for b in range(len(best)):
        labels[b, :lengths[b]] = best[b, keep[b]]
    return labels, lengths


def np_ctc_greedy_groupby(x: np.ndarray, blank: int = 0) -> list[list[int]]:
    """The per-sequence decoder many projects ship: argmax, then itertools.groupby."""
    import itertools

    return [[int(k) for k, _ in itertools.groupby(row) if k != blank] for row in x.argmax(-1)]


def np_nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.5) -> np.ndarray:
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = w * h
        order = rest[inter / (area[i] + area[rest] - inter) <= iou]
    return np.array(keep, np.int64)


def np_normalize_nchw(x, mean, std, scale):
    return np.ascontiguousarray(((x * scale - mean) / std).transpose(0, 3, 1, 2))


def median_times(calls: dict, rounds: int) -> dict[str, float]:
    return interleaved(calls, rounds, warmup=1)


def report(title: str, med: dict[str, float]) -> None:
    base = med["numpy"]
    print(f"{title}")
    for key, value in med.items():
        extra = "" if key.startswith("numpy") else f"   {base / value:6.1f}x faster than numpy"
        print(f"    {key:<16} {value * 1e3:9.3f} ms{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    import numba

    from plugins.kernels import postprocess

    rng = np.random.default_rng(0)
    print(f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads, "
          f"numpy {np.__version__}\n")

    logits = (rng.standard_normal((64, 32000)) * 4).astype(np.float32)
    want = np_softmax_topk(logits, 5)
    got = postprocess.softmax_topk(logits, 5)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
    report("softmax + top-5, [64, 32000]", median_times({
        "numpy": lambda: np_softmax_topk(logits, 5),
        "numba": lambda: postprocess.softmax_topk(logits, 5),
        "numba parallel": lambda: postprocess.softmax_topk(logits, 5, parallel=True),
    }, args.rounds))

    scores = rng.standard_normal((32, 200, 80)).astype(np.float32)
    scores[:, :, 0] += 1.5  # blanks are common, as in real CTC output
    want = np_ctc_greedy(scores)
    got = postprocess.ctc_greedy(scores)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np_ctc_greedy_groupby(scores)[0] == want[0][0, :want[1][0]].tolist()
    report("CTC greedy decoding, [32, 200, 80]", median_times({
        "numpy": lambda: np_ctc_greedy(scores),
        "numpy+groupby": lambda: np_ctc_greedy_groupby(scores),
        "numba": lambda: postprocess.ctc_greedy(scores),
        "numba parallel": lambda: postprocess.ctc_greedy(scores, parallel=True),
    }, args.rounds * 10))  # calls of ~0.05 ms: ten times the samples for a steady median

    corners = rng.uniform(0, 1000, (10_000, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(5, 60, (10_000, 2))], 1)
    boxes = boxes.astype(np.float32)
    box_scores = rng.uniform(0, 1, 10_000).astype(np.float32)
    want = np_nms(boxes, box_scores)
    got = postprocess.nms(boxes, box_scores)[0]
    assert np.array_equal(got, want)
    report(f"NMS, 10,000 boxes ({len(want)} kept)", median_times({
        "numpy": lambda: np_nms(boxes, box_scores),
        "numba": lambda: postprocess.nms(boxes, box_scores),
    }, max(5, args.rounds // 3)))

    image = rng.uniform(0, 255, (8, 224, 224, 3)).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def numba_two_stages():
        (nchw,) = postprocess.nhwc_to_nchw(image)
        return postprocess.normalize(nchw, mean, std, 1 / 255)

    want = np_normalize_nchw(image, mean, std, 1 / 255)
    assert np.allclose(numba_two_stages()[0], want, atol=1e-4)
    assert np.allclose(postprocess.nhwc_to_nchw_normalize(image, mean, std, 1 / 255)[0], want,
                       atol=1e-4)
    report("NHWC->NCHW + normalise, [8, 224, 224, 3]", median_times({
        "numpy": lambda: np_normalize_nchw(image, mean, std, 1 / 255),
        "numba, fused": lambda: postprocess.nhwc_to_nchw_normalize(image, mean, std, 1 / 255),
        "numba, 2 kernels": numba_two_stages,
    }, args.rounds))


if __name__ == "__main__":
    main()
