"""``distill``: knowledge distillation as an optimizer.

The source version is the teacher. A smaller student of the teacher's kind
(see :mod:`plugins.optimizers.distill_students`) is trained with PyTorch on
the teacher's soft targets over the representative inputs (``--sample`` files
or ``--calibration``): KL divergence of the temperature-``T`` softmaxes for
logits (times T^2, Hinton et al.), mixed with cross-entropy on hard labels by
``alpha`` when labels are given; normalised mean-squared error for other
float outputs (hidden states). A seeded hold-out split stops training early
and keeps the best epoch; after training, the calibration keeps only the
held-out inputs, so the pipeline's accuracy budget and report judge the
student on inputs it never trained on.

torch is an optional extra (``shardserve[distill]``), imported only here,
inside ``apply``; serving never imports this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import BadRequest

from .base import Calibration, Optimizer, Option, Tolerance
from .progress import progress

MIN_TRAIN, MIN_HELD_OUT = 8, 4
OPTIMIZERS = ("sgd", "momentum", "adam")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.01, "adam": 0.001}
EVAL_CHUNK = 256


@dataclass
class Target:
    """One trained-on tensor: a graph output, or the logits under an output's Softmax."""

    name: str
    kind: str  # "logits" (softmax over the last axis) or "hidden"


def _targets(model: Any) -> list[Target]:
    from onnx import TensorProto

    producer = {out: n for n in model.graph.node for out in n.output}
    out: list[Target] = []
    for o in model.graph.output:
        node = producer.get(o.name)
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            rank = len(o.type.tensor_type.shape.dim)
            if axis in (-1, rank - 1):
                target = Target(node.input[0], "logits")
                if target not in out:
                    out.append(target)
                continue
        if o.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE,
                                                TensorProto.FLOAT16):
            continue  # ArgMax labels and other integers: not differentiable
        dims = o.type.tensor_type.shape.dim
        is_scores = len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 1
        target = Target(o.name, "logits" if is_scores else "hidden")
        if target not in out:
            out.append(target)
    if not out:
        raise BadRequest("distill needs a model with a float output to learn from")
    return out


def _stack(calibration: Calibration) -> dict:
    """The calibration batches as one array per input (samples on the first axis)."""
    import numpy as np

    if not calibration.batches:
        raise BadRequest("distill needs representative inputs: --sample FILE.npz or a directory")
    names = list(calibration.batches[0])
    out = {}
    for name in names:
        parts = [np.asarray(b[name]) for b in calibration.batches]
        if any(p.ndim == 0 for p in parts):
            raise BadRequest(f"distill needs a batch dim on every input; {name!r} is a scalar")
        if len({p.shape[1:] for p in parts}) > 1:
            raise BadRequest(f"distill: sample arrays of {name!r} differ in shape beyond the "
                             "first (batch) axis; give samples of one shape")
        out[name] = np.concatenate(parts)
    counts = {len(a) for a in out.values()}
    if len(counts) != 1:
        raise BadRequest("distill: inputs hold different numbers of samples")
    return out


def _labels(path: str, count: int) -> Any:
    import numpy as np

    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise BadRequest(f"distill labels file {file.name!r} does not exist")
    try:
        data = np.load(file, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                keys = data.files
                if len(keys) != 1 and "labels" not in keys:
                    raise BadRequest("a labels .npz must hold one array, or one named 'labels'")
                data = data["labels" if "labels" in keys else keys[0]]
    except (OSError, ValueError, EOFError) as exc:
        raise BadRequest(f"distill labels file {file.name!r} is not a readable .npy/.npz "
                         f"({type(exc).__name__})") from None
    if data.ndim != 1 or data.dtype.kind not in "iu":
        raise BadRequest(f"distill labels must be one integer per sample, got dtype "
                         f"{data.dtype} shape {list(data.shape)}")
    if len(data) != count:
        raise BadRequest(f"distill labels: {len(data)} labels for {count} samples")
    return data.astype(np.int64)


def _check_teacher(model: Any, teacher: Any, feed: dict) -> None:
    """The torch run of the teacher must match onnxruntime's, or the targets are wrong."""
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    expected = sess.run(names, feed)
    with torch.no_grad():
        got = teacher.run({k: torch.from_numpy(v) for k, v in feed.items()}, names)
    for name, want in zip(names, expected):
        if want.dtype.kind != "f":
            continue
        have = got[name].numpy()
        diff = float(np.max(np.abs(have - want), initial=0.0))
        if have.shape != want.shape or not diff <= 1e-3 * max(1.0, float(np.max(np.abs(want)))):
            raise BadRequest(f"distill cannot reproduce the teacher's output {name!r} in torch "
                             f"(max abs diff {diff:.3g}); this model is not supported")


class Distiller(Optimizer):
    name = "distill"
    summary = ("knowledge distillation: trains a smaller student on the teacher's soft targets "
               "(needs shardserve[distill])")
    options = (
        Option("student", str, "auto", "student kind: mlp (fresh narrower/shallower dense "
               "layers), pruned (CNN, channel-pruned teacher), layers (transformer encoder, "
               "every n-th layer kept), auto", choices=("auto", "mlp", "pruned", "layers")),
        Option("width", float, 0.25, "hidden width (mlp) or channels kept (pruned) as a "
               "fraction of the teacher's", low=0.01, high=1.0),
        Option("depth", int, 0, "hidden layers of an mlp student (0: the teacher's)",
               low=0, high=64),
        Option("every", int, 2, "layers student: keep every n-th repeated layer", low=2,
               high=64),
        Option("temperature", float, 4.0, "softmax temperature of the soft targets",
               low=0.05, high=100.0),
        Option("alpha", float, 0.5, "weight of the hard-label loss when labels are given",
               low=0.0, high=1.0),
        Option("labels", str, "", ".npy file: one integer label per sample (optional)"),
        Option("optimizer", str, "adam", "training algorithm", choices=OPTIMIZERS),
        Option("lr", float, 0.0, "learning rate (0: sgd 0.1, momentum 0.01, adam 0.001)",
               low=0.0, high=10.0),
        Option("momentum", float, 0.9, "momentum of the momentum optimizer", low=0.0,
               high=0.999),
        Option("epochs", int, 100, "most training epochs", low=1, high=100_000),
        Option("batch", int, 32, "training batch size", low=1, high=65536),
        Option("patience", int, 10, "stop after this many epochs without a better held-out "
               "loss", low=1, high=100_000),
        Option("holdout", float, 0.2, "fraction of the samples held out", low=0.05, high=0.5),
        Option("min_retention", float, 0.97, "with labels: the student's held-out accuracy "
               "must be at least this fraction of the teacher's", low=0.0, high=1.0),
        Option("seed", int, 0, "seed of the split, the student's weights and the shuffling",
               low=0, high=2**31 - 1),
        Option("threads", int, 1, "torch threads", low=1, high=256),
    )
    needs_calibration = True
    # what DistilBERT kept (97 %); the cosine floor suits hidden-state outputs
    default_tolerance = Tolerance(min_top1=0.97, min_cosine=0.9)

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        try:
            import torch
        except ImportError:
            raise BadRequest("distill needs PyTorch: pip install 'shardserve[distill]'") from None
        from . import distill_students as students
        from .distill_torch import TorchGraph

        if calibration.source.endswith("through the source plan"):  # shards.py, per shard
            raise BadRequest("distill trains whole models, not shards: distill an unpartitioned "
                             "version (--source-version), then partition the student")
        if calibration.source.split(" ", 2)[1:2] == ["generated"]:
            raise BadRequest("distill needs representative inputs, not generated noise: give "
                             "--sample FILE.npz (or a directory of them) or --calibration DIR")
        data = _stack(calibration)
        count = len(next(iter(data.values())))
        held = max(MIN_HELD_OUT, int(round(count * options["holdout"])))
        if count - held < MIN_TRAIN:
            raise BadRequest(f"distill needs at least {MIN_TRAIN + MIN_HELD_OUT} samples "
                             f"({MIN_TRAIN} to train on, {MIN_HELD_OUT} held out); got {count}")
        labels = _labels(options["labels"], count)
        kind = students.choose_kind(model, options["student"])
        if kind == "mlp":
            student = students.mlp_student(model, options["width"], options["depth"],
                                           options["seed"])
        elif kind == "pruned":
            student = students.pruned_student(model, options["width"], calibration)
        else:
            student = students.layer_student(model, options["every"])
        teacher_graph, student_graph = TorchGraph(model), TorchGraph(student.model)
        t_targets, s_targets = _targets(model), _targets(student.model)
        if [t.kind for t in t_targets] != [t.kind for t in s_targets]:
            raise BadRequest("distill: the student's outputs do not match the teacher's")
        if labels is not None and "logits" not in [t.kind for t in t_targets]:
            raise BadRequest("distill labels need a classifier output (logits or a Softmax)")

        import numpy as np

        order = np.random.default_rng(options["seed"]).permutation(count)
        train_idx, held_idx = np.sort(order[held:]), np.sort(order[:held])
        threads = torch.get_num_threads()
        torch.set_num_threads(options["threads"])
        try:
            _check_teacher(model, teacher_graph,
                           {k: np.ascontiguousarray(v[held_idx[:EVAL_CHUNK]]) for k, v in
                            data.items()})
            result = _train(torch, teacher_graph, student_graph, t_targets, s_targets, data,
                            labels, train_idx, held_idx, options)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            # torch's own errors on a graph it cannot run: one line, never a traceback
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BadRequest(f"distill could not run this model in torch: {first}") from None
        finally:
            torch.set_num_threads(threads)
        out = student.model
        student_graph.write_back(out)
        teacher_params, student_params = (teacher_graph.parameter_count(),
                                          student_graph.parameter_count())
        notes = [
            f"distill: student {student.description}: {student_params:,} of "
            f"{teacher_params:,} teacher parameters ({student_params / teacher_params:.1%})",
            f"distill: {options['optimizer']} lr {result['lr']:g}, T {options['temperature']:g}"
            + (f", alpha {options['alpha']:g} (labels)" if labels is not None else "")
            + f", {result['epochs']} epoch(s) (best {result['best_epoch']}"
            + (", stopped early" if result["stopped"] else "")
            + f"), {len(train_idx)} training samples, {result['seconds']:.1f} s",
            f"distill: held-out {result['metric_name']} {result['metric']:.4f}; the figures "
            f"above are on the {len(held_idx)} held-out samples",
        ]
        retention = None
        if labels is not None:
            retention = result["student_acc"] / max(result["teacher_acc"], 1e-12)
            notes.append(f"distill: held-out accuracy on labels: teacher "
                         f"{result['teacher_acc']:.2%}, student {result['student_acc']:.2%} "
                         f"(retention {retention:.2%}, budget >= {options['min_retention']:.0%})")
        calibration.notes.extend(notes)
        # the pipeline measures on what it was given: from now on the held-out inputs only
        calibration.batches[:] = [
            {k: np.ascontiguousarray(v[held_idx[i:i + 64]]) for k, v in data.items()}
            for i in range(0, len(held_idx), 64)]
        calibration.source += f" ({len(held_idx)} held out from distillation)"
        if retention is not None and retention < options["min_retention"]:
            from .pipeline import AccuracyBudgetExceeded

            raise AccuracyBudgetExceeded(
                f"accuracy budget broken (the student keeps {retention:.2%} of the teacher's "
                f"held-out accuracy < {options['min_retention']:.0%}; teacher "
                f"{result['teacher_acc']:.2%}, student {result['student_acc']:.2%}): "
                "nothing was published")
        return out


def _train(torch: Any, teacher: Any, student: Any, t_targets: list, s_targets: list,
           data: dict, labels: Any, train_idx: Any, held_idx: Any, options: dict) -> dict:
    """Seeded minibatch training with early stopping on the held-out loss."""
    import torch.nn.functional as F

    torch.manual_seed(options["seed"])
    tensors = {k: torch.from_numpy(v) for k, v in data.items()}
    y = None if labels is None else torch.from_numpy(labels)
    t_names, s_names = [t.name for t in t_targets], [t.name for t in s_targets]
    kinds = [t.kind for t in t_targets]
    with torch.no_grad():  # the teacher's targets, once
        soft: list[list] = [[] for _ in t_names]
        for i in range(0, len(next(iter(tensors.values()))), EVAL_CHUNK):
            outs = teacher.run({k: v[i:i + EVAL_CHUNK] for k, v in tensors.items()}, t_names)
            for j, name in enumerate(t_names):
                soft[j].append(outs[name].float())
        targets = [torch.cat(parts) for parts in soft]
    if y is not None:
        classes = targets[kinds.index("logits")].shape[-1]
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise BadRequest(f"distill labels must lie in 0..{classes - 1} (the teacher has "
                             f"{classes} classes), got {int(y.min())}..{int(y.max())}")
    T, alpha = options["temperature"], options["alpha"]

    def loss_of(idx: Any) -> tuple[Any, list]:
        outs = student.run({k: v[idx] for k, v in tensors.items()}, s_names)
        total, got = 0.0, []
        for j, (kind, name) in enumerate(zip(kinds, s_names)):
            s, t = outs[name], targets[j][idx]
            got.append(s)
            if kind == "logits":
                s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
                kd = F.kl_div(F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1),
                              log_target=True, reduction="batchmean") * T * T
                if y is not None and j == kinds.index("logits") and s.dim() == 2:
                    total = total + alpha * F.cross_entropy(s, y[idx]) + (1 - alpha) * kd
                else:
                    total = total + kd
            else:
                total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
        return total, got

    def held_out() -> tuple[float, float, list]:
        with torch.no_grad():
            loss, got = loss_of(torch.from_numpy(held_idx))
        held_t = [t[torch.from_numpy(held_idx)] for t in targets]
        if "logits" in kinds:
            j = kinds.index("logits")
            metric = float((got[j].argmax(-1) == held_t[j].argmax(-1)).float().mean())
        else:
            j = 0
            a, b = got[0].reshape(len(held_idx), -1), held_t[0].reshape(len(held_idx), -1)
            metric = float(F.cosine_similarity(a, b, dim=1).mean())
        return float(loss), metric, got

    params = list(student.params.values())
    lr = options["lr"] or DEFAULT_LR[options["optimizer"]]
    if options["optimizer"] == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=options["momentum"]
                              if options["optimizer"] == "momentum" else 0.0)
    generator = torch.Generator().manual_seed(options["seed"])
    train = torch.from_numpy(train_idx)
    best_loss, best_metric = held_out()[:2]
    best_state, best_epoch, waited, stopped, epoch = student.state(), 0, 0, False, 0
    start = time.perf_counter()
    bar = progress(total=options["epochs"], desc="distill", unit="epoch")
    for epoch in range(1, options["epochs"] + 1):
        perm = train[torch.randperm(len(train), generator=generator)]
        running = 0.0
        for i in range(0, len(perm), options["batch"]):
            loss, _ = loss_of(perm[i:i + options["batch"]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += float(loss.detach()) * len(perm[i:i + options["batch"]])
        loss_h, metric, _ = held_out()
        bar.update(1)
        bar.set_postfix_str(f"loss {running / len(perm):.4f} held-out loss {loss_h:.4f} "
                            f"agreement {metric:.4f}")
        if loss_h < best_loss:
            best_loss, best_metric, best_state, best_epoch, waited = (
                loss_h, metric, student.state(), epoch, 0)
        else:
            waited += 1
            if waited >= options["patience"]:
                stopped = True
                break
    bar.close()
    seconds = time.perf_counter() - start
    student.load(best_state)
    result = {"epochs": epoch, "best_epoch": best_epoch, "stopped": stopped, "lr": lr,
              "seconds": seconds, "metric": best_metric, "held_loss": best_loss,
              "metric_name": "top-1 agreement" if "logits" in kinds else "cosine"}
    if y is not None:
        j = kinds.index("logits")
        held = torch.from_numpy(held_idx)
        with torch.no_grad():
            got = student.run({k: v[held] for k, v in tensors.items()}, [s_names[j]])
        result["student_acc"] = float((got[s_names[j]].argmax(-1) == y[held]).float().mean())
        result["teacher_acc"] = float((targets[j][held].argmax(-1) == y[held]).float().mean())
    return result
