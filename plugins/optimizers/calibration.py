"""Calibration and evaluation inputs: a directory of ``<input name>.npy``
files, or seeded generated data, checked against the model's signature.

Each file's first axis counts samples; the rest of its shape must match the
input's (dynamic dimensions accept any size) and its dtype must be the
input's exactly. All files must hold the same number of samples. A rank-0
(scalar) input's file holds either one 0-d value, used in every batch, or one
value per sample (shape [N]; batches then hold one sample each). Generated
inputs are standard-normal floats (integers 0..9) with a fixed seed; dynamic
dimensions other than the batch take the sizes ``plugins.sample_inputs``
resolves (``--input-shape``, model.toml ``[sample]``, the dims' names).

``--sample FILE.npz`` files (see ``plugins.sample_inputs``) are the other
source: each file is one calibration batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import BadRequest

from .base import Calibration


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: Any  # numpy dtype
    shape: list[int | None]  # None = dynamic (a negative dim_value too)
    dim_names: tuple = ()  # dim_param of each dim, None where it has none


def input_specs(model: Any) -> list[InputSpec]:
    """The graph inputs that are not initializers, with numpy dtypes."""
    from plugins.sample_inputs import onnx_signature

    return [InputSpec(s.name, s.dtype, list(s.shape), s.dim_names)
            for s in onnx_signature(model)]


def signature(specs: list[InputSpec]) -> list:
    """``specs`` as ``plugins.sample_inputs.InputSignature`` (for sizes and sample files)."""
    from plugins.sample_inputs import InputSignature

    return [InputSignature(s.name, s.dtype, tuple(s.shape), tuple(s.dim_names)) for s in specs]


def _batch_size(spec: InputSpec, batch: int) -> int:
    return batch if not spec.shape or spec.shape[0] is None else spec.shape[0]


def _split(arrays: dict[str, Any], specs: list[InputSpec], batch: int) -> list[dict]:
    """Batches of ``batch`` samples; rank-0 inputs: the one value everywhere, or one value per
    sample (then one sample per batch)."""
    ranked = [s for s in specs if s.shape]
    scalars = [s for s in specs if not s.shape]
    if not ranked:
        per_sample = [s for s in scalars if arrays[s.name].ndim == 1]
        if not per_sample:
            return [dict(arrays)]
        count = len(arrays[per_sample[0].name])
        return [{s.name: _item(arrays[s.name], i) for s in scalars} for i in range(count)]
    per_sample = any(arrays[s.name].ndim == 1 for s in scalars)
    step = _batch_size(ranked[0], 1 if per_sample else batch)
    rows = _batch_size(ranked[0], 1)  # rows per sample
    total = len(arrays[ranked[0].name])
    out = []
    for start in range(0, total - step + 1, step):
        feed = {s.name: arrays[s.name][start:start + step] for s in ranked}
        for s in scalars:
            value = arrays[s.name]
            feed[s.name] = _item(value, start // rows)
        out.append(feed)
    return out


def _item(value: Any, index: int) -> Any:
    """A rank-0 input's value for sample ``index``: a 0-d array (never a numpy scalar,
    which onnxruntime refuses)."""
    import numpy as np

    return np.array(value[index]) if value.ndim == 1 else value


def load_directory(directory: str | Path, specs: list[InputSpec], batch: int) -> Calibration:
    """Calibration batches from ``<directory>/<input>.npy``, checked against ``specs``."""
    import numpy as np

    root = Path(directory)
    if not root.is_dir():
        raise BadRequest("the calibration directory does not exist")
    names = {spec.name for spec in specs}
    extra = sorted(p.name for p in root.glob("*.npy") if p.stem not in names)
    if extra:
        raise BadRequest(
            f"unexpected calibration file {extra[0]!r}; model inputs: {', '.join(sorted(names))}"
        )
    arrays = {}
    for spec in specs:
        where = f"calibration input {spec.name!r}"
        path = root / f"{spec.name}.npy"
        if not path.is_file():
            raise BadRequest(f"{where}: no {spec.name}.npy in the calibration directory")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"{where}: not a readable .npy file ({type(exc).__name__})") from None
        if array.dtype != spec.dtype:
            raise BadRequest(f"{where}: dtype {array.dtype}, the model expects {spec.dtype}")
        if not spec.shape:
            if array.ndim > 1:
                raise BadRequest(f"{where}: shape {list(array.shape)}, the input is a scalar "
                                 "(rank 0): give a 0-d array, or one value per sample (shape "
                                 "[N])")
            arrays[spec.name] = array
            continue
        want = ["N", *(("?" if d is None else d) for d in spec.shape[1:])]
        ok = array.ndim == len(spec.shape) and all(
            d is None or d == got for d, got in zip(spec.shape[1:], array.shape[1:])
        )
        if spec.shape and spec.shape[0] is not None and array.ndim == len(spec.shape):
            ok = ok and array.shape[0] % spec.shape[0] == 0
        if not ok:
            raise BadRequest(
                f"{where}: shape {list(array.shape)}, "
                f"the model expects [{', '.join(map(str, want))}]"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadRequest(f"{where}: contains NaN or infinity")
        if len(array) == 0:
            raise BadRequest(f"{where}: holds no samples")
        arrays[spec.name] = array
    counts = {len(arrays[s.name]) // _batch_size(s, 1) for s in specs if s.shape}
    counts |= {len(arrays[s.name]) for s in specs if not s.shape and arrays[s.name].ndim == 1}
    if len(counts) > 1:
        raise BadRequest("calibration inputs hold different numbers of samples")
    batches = _split(arrays, specs, batch) or [arrays]
    return Calibration(batches, f"{counts.pop() if counts else 1} samples from files")


def from_samples(samples: Any) -> Calibration:
    """One calibration batch per ``--sample`` file (a ``plugins.sample_inputs.Samples``)."""
    return Calibration([dict(feed) for feed in samples.files],
                       f"{len(samples.files)} sample file(s)")


def generate(specs: list[InputSpec], samples: int, batch: int, seed: int,
             shapes: dict[str, list[int]] | None = None) -> Calibration:
    """Seeded inputs shaped like the model's, for models without calibration files.

    ``shapes`` sizes dynamic dims other than the batch (``Samples.shapes``); without
    it such a dim stops with a message naming it.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        dims = list(spec.shape)
        given = (shapes or {}).get(spec.name)
        for i, d in enumerate(dims[1:], start=1):
            if d is None and given is not None:
                dims[i] = given[i]
            elif d is None:
                raise BadRequest(
                    f"input {spec.name!r} has dynamic dimension {i} besides the batch: set it "
                    f"with --input-shape {spec.name}=D1,D2,... or give --sample files"
                )
        shape = [samples * (dims[0] or 1), *dims[1:]] if dims else []
        if spec.dtype.kind == "f":
            array = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            array = rng.integers(0, 10, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            array = rng.random(shape) < 0.5
        else:
            raise BadRequest(f"input {spec.name!r}: cannot generate {spec.dtype} data")
        arrays[spec.name] = array
    return Calibration(_split(arrays, specs, batch), f"{samples} generated samples, seed {seed}")
