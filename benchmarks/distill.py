"""What distillation buys and costs: students against their teachers, and the
training algorithms against each other, on this machine.

    .venv/bin/python benchmarks/distill.py [--quick]

1. Students of the digits classifier (examples/models/digits_mlp, trained on
   scikit-learn's digits, test_size=0.25, random_state=0): MLPs of several
   widths and depths, trained on the training split (hard labels mixed in,
   alpha 0.5), scored on the test split against the teacher.
2. A 4-layer post-LN transformer encoder (width 64, seq 16, built here with
   seeded weights) and its layer-dropped student (every other layer kept),
   trained on 512 seeded inputs; cosine on 256 fresh ones.
3. The CNN example (cnn_skip, seeded weights) and a channel-pruned student at
   half width, on 256 seeded images (agreement with a random teacher).
4. SGD, SGD with momentum and Adam on the same digits student (64-64-10,
   soft targets only), a fixed number of epochs, no early stopping.
5. The torch trainer (the ONNX graph interpreted with autograd) against a
   hand-written numpy forward/backward/Adam for the same 64-64-10 student.

Every student goes through ``plugins.optimizers.pipeline.run_chain`` (the code
behind ``shardserve optimize``) on copies in a temp directory; size, latency
(median of interleaved single-threaded onnxruntime runs) and held-out
agreement come from its report; training time from the distill notes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

from build_models import PIXEL_MAX, load_digits_split  # noqa: E402

EXAMPLES = ROOT / "examples" / "models"


def _registry():
    from plugins.optimizers.pipeline import optimizer_registry
    from runtime import Runtime

    return optimizer_registry(Runtime.from_config({"repository": {"load": "none"}}).pm)


def _distil(root: Path, model: str, spec: str, sample: Path, **budget) -> dict:
    from plugins.optimizers.measure import latency, session
    from plugins.optimizers.pipeline import Settings, parse_step, run_chain

    steps = [parse_step(_registry(), s) for s in spec.split(";")]
    lines: list[str] = []
    outcome = run_chain(root, model, steps, Settings(sample=[str(sample)], latency_runs=0,
                                                     budget=budget), out=lines.append)
    text = "\n".join(lines)
    # batch-1 latency (the pipeline times the first sample file, here the whole set)
    with np.load(sample) as data:
        feed = {k: np.ascontiguousarray(data[k][:1]) for k in data.files}
    teacher, student = (session((root / model / str(v) / "model.onnx").read_bytes())
                        for v in (1, outcome.version))
    times = latency(teacher, student, feed, runs=300)
    train = re.search(r"training samples, ([\d.]+) s", text)
    params = re.search(r"([\d,]+) of ([\d,]+) teacher parameters", text)
    epochs = re.search(r"(\d+) epoch\(s\) \(best (\d+)", text)
    r = outcome.report
    return {"version": outcome.version, "size": (r.size_before, r.size_after),
            "latency": times, "top1": r.top1, "cosine": r.cosine,
            "train_s": float(train.group(1)), "epochs": (int(epochs.group(1)),
                                                         int(epochs.group(2))),
            "params": tuple(int(p.replace(",", "")) for p in params.groups()), "text": text}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def digits_students(tmp: Path, epochs: int) -> list[str]:
    import onnxruntime as ort

    x_train, x_test, y_train, y_test = load_digits_split()
    np.savez(tmp / "digits.npz", pixels=x_train.astype(np.float32))
    np.save(tmp / "labels.npy", y_train.astype(np.int64))
    rows = ["| student | parameters | size (KiB) | latency ms (batch 1) | held-out agreement "
            "| test accuracy (teacher → student) | retention | epochs (best) | training s |",
            "|---|---|---|---|---|---|---|---|---|"]

    def accuracy(path: Path) -> float:
        sess = ort.InferenceSession(str(path))
        return float(np.mean(sess.run(["label"], {"pixels": x_test.astype(np.float32)})[0]
                             == y_test))

    for width, depth in ((0.25, 1), (0.125, 1), (0.25, 2), (0.0625, 1)):
        root = tmp / f"digits_{width}_{depth}"
        shutil.copytree(EXAMPLES / "digits_mlp", root / "digits_mlp")
        got = _distil(root, "digits_mlp", f"distill:width={width},depth={depth},epochs={epochs},"
                      f"batch=64,lr=0.01,min_retention=0,labels={tmp / 'labels.npy'}",
                      tmp / "digits.npz",
                      min_top1=0.0, min_cosine=0.0)
        teacher = accuracy(root / "digits_mlp/1/model.onnx")
        student = accuracy(root / f"digits_mlp/{got['version']}/model.onnx")
        name = re.search(r"student (mlp [\d-]+)", got["text"]).group(1)
        rows.append(
            f"| {name} | {got['params'][0]:,} / {got['params'][1]:,} "
            f"({got['params'][0] / got['params'][1]:.0%}) | {got['size'][0] / 1024:.1f} → "
            f"{got['size'][1] / 1024:.1f} | {_ms(got['latency'][0])} → "
            f"{_ms(got['latency'][1])} | {got['top1']:.2%} | {teacher:.2%} → {student:.2%} | "
            f"{student / teacher:.1%} | {got['epochs'][0]} ({got['epochs'][1]}) | "
            f"{got['train_s']:.1f} |")
    return rows


def encoder_and_cnn(tmp: Path, epochs: int) -> list[str]:
    import onnx
    import onnxruntime as ort
    from test_distill import _encoder

    rows = ["| teacher → student | parameters | size (KiB) | latency ms (batch 1) "
            "| held-out agreement / cosine | fresh-input cosine | epochs (best) | training s |",
            "|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(5)
    root = tmp / "enc"
    (root / "encoder/1").mkdir(parents=True)
    onnx.save(_encoder(layers=4, d=64, heads=4, seq=16, ff=256, seed=3),
              root / "encoder/1/model.onnx")
    (root / "encoder/model.toml").write_text('backend = "onnxruntime"\n')
    np.savez(tmp / "tokens.npz", tokens=rng.standard_normal((512, 16, 64)).astype(np.float32))
    got = _distil(root, "encoder", f"distill:epochs={epochs}", tmp / "tokens.npz",
                  min_cosine=0.0)
    fresh = {"tokens": rng.standard_normal((256, 16, 64)).astype(np.float32)}
    a = ort.InferenceSession(str(root / "encoder/1/model.onnx")).run(None, fresh)[0]
    b = ort.InferenceSession(str(root / f"encoder/{got['version']}/model.onnx")).run(None,
                                                                                    fresh)[0]
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cosine = float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1)
                           / np.linalg.norm(b, axis=1)))
    rows.append(
        f"| encoder 4 layers → 2 (width 64, seq 16) | {got['params'][0]:,} / "
        f"{got['params'][1]:,} | {got['size'][0] / 1024:.1f} → {got['size'][1] / 1024:.1f} | "
        f"{_ms(got['latency'][0])} → {_ms(got['latency'][1])} | cosine {got['cosine']:.4f} | "
        f"{cosine:.4f} | {got['epochs'][0]} ({got['epochs'][1]}) | {got['train_s']:.1f} |")
    root = tmp / "cnn"
    shutil.copytree(EXAMPLES / "cnn_skip", root / "cnn_skip")
    np.savez(tmp / "images.npz", image=rng.standard_normal((256, 3, 32, 32)).astype(np.float32))
    got = _distil(root, "cnn_skip", f"distill:width=0.5,epochs={epochs}", tmp / "images.npz",
                  min_cosine=0.0, min_top1=0.0)
    rows.append(
        f"| cnn_skip → channel-pruned, 50 % width | {got['params'][0]:,} / "
        f"{got['params'][1]:,} | {got['size'][0] / 1024:.1f} → {got['size'][1] / 1024:.1f} | "
        f"{_ms(got['latency'][0])} → {_ms(got['latency'][1])} | top-1 {got['top1']:.2%} | - | "
        f"{got['epochs'][0]} ({got['epochs'][1]}) | {got['train_s']:.1f} |")
    return rows


def algorithms(tmp: Path, epochs: int) -> list[str]:
    rows = ["| optimizer (lr) | held-out agreement | held-out cosine | best epoch | training s |",
            "|---|---|---|---|---|"]
    for name in ("sgd", "momentum", "adam"):
        root = tmp / f"algo_{name}"
        shutil.copytree(EXAMPLES / "digits_mlp", root / "digits_mlp")
        got = _distil(root, "digits_mlp", f"distill:width=0.25,optimizer={name},epochs={epochs},"
                      f"patience={epochs}", tmp / "digits.npz", min_top1=0.0, min_cosine=0.0)
        lr = re.search(rf"{name} lr ([\d.e-]+)", got["text"]).group(1)
        rows.append(f"| {name} ({lr}) | {got['top1']:.2%} | {got['cosine']:.4f} | "
                    f"{got['epochs'][1]} | {got['train_s']:.1f} |")
    return rows


def numpy_versus_torch(tmp: Path, epochs: int) -> list[str]:
    """The same 64-64-10 student, soft targets only (T 4), Adam 0.001, batch 32."""
    import onnx
    from onnx import numpy_helper

    from plugins.optimizers.base import Calibration
    from plugins.optimizers.distill import Distiller

    x_train = load_digits_split()[0].astype(np.float32)
    teacher = onnx.load(EXAMPLES / "digits_mlp/1/model.onnx")
    w = {i.name: numpy_helper.to_array(i) for i in teacher.graph.initializer}
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x_train))
    held, train = order[:len(x_train) // 5], order[len(x_train) // 5:]
    x = x_train / PIXEL_MAX
    logits = np.maximum(x @ w["hidden.weight"] + w["hidden.bias"], 0) @ w["output.weight"] \
        + w["output.bias"]
    T, lr, batch = 4.0, 1e-3, 32

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    params = [rng.uniform(-np.sqrt(6 / 64), np.sqrt(6 / 64), (64, 64)).astype(np.float32),
              np.zeros(64, np.float32),
              rng.uniform(-np.sqrt(6 / 64), np.sqrt(6 / 64), (64, 10)).astype(np.float32),
              np.zeros(10, np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    step = 0
    start = time.perf_counter()
    for _ in range(epochs):
        perm = train[rng.permutation(len(train))]
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            h_pre = x[idx] @ params[0] + params[1]
            h = np.maximum(h_pre, 0)
            z = h @ params[2] + params[3]
            dz = T * (softmax(z / T) - softmax(logits[idx] / T)) / len(idx)
            dh = (dz @ params[2].T) * (h_pre > 0)
            grads = [x[idx].T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)]
            step += 1
            for k, g in enumerate(grads):
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                mh, vh = m[k] / (1 - 0.9 ** step), v[k] / (1 - 0.999 ** step)
                params[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    numpy_s = time.perf_counter() - start
    z = np.maximum(x[held] @ params[0] + params[1], 0) @ params[2] + params[3]
    numpy_agree = float(np.mean(z.argmax(1) == logits[held].argmax(1)))

    import torch

    torch.set_num_threads(1)
    optimizer = Distiller()
    calibration = Calibration([{"pixels": x_train}], f"{len(x_train)} samples from files")
    options = optimizer.validate({"width": 0.25, "epochs": epochs, "patience": epochs,
                                  "lr": lr, "batch": batch})
    start = time.perf_counter()
    optimizer.apply(teacher, options, calibration)
    torch_s = time.perf_counter() - start
    torch_agree = float(re.search(r"agreement ([\d.]+)", " ".join(calibration.notes)).group(1))
    return ["| trainer | epochs | held-out agreement | seconds (whole apply for torch) |",
            "|---|---|---|---|",
            f"| numpy, hand-written backward (this MLP only) | {epochs} | {numpy_agree:.2%} | "
            f"{numpy_s:.1f} |",
            f"| torch, the ONNX graph interpreted with autograd | {epochs} | {torch_agree:.2%} | "
            f"{torch_s:.1f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    args = parser.parse_args()
    os.environ.setdefault("SHARDSERVE_PROGRESS", "0")
    import torch

    torch.set_num_threads(1)
    epochs = 5 if args.quick else 60
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, 1 thread; load average {load:.2f} on "
          f"{os.cpu_count()} CPUs{' (figures taken under load)' if load > 2.5 else ''}\n")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for title, rows in (
            ("Digits students (test split: 450 samples)", digits_students(tmp, epochs * 2)),
            ("Encoder and CNN students", encoder_and_cnn(tmp, epochs)),
            (f"Training algorithms, 64-64-10 digits student, {epochs} epochs",
             algorithms(tmp, epochs)),
            (f"numpy against torch, 64-64-10 digits student, {epochs} epochs",
             numpy_versus_torch(tmp, epochs)),
        ):
            print(f"### {title}\n")
            print("\n".join(rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
