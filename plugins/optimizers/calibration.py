"""Calibration and evaluation inputs: a directory of ``<input name>.npy``
files, or seeded generated data, checked against the model's signature.

Each file's first axis counts samples; the rest of its shape must match the
input's (dynamic dimensions accept any size) and its dtype must be the
input's exactly. All files must hold the same number of samples. Generated
inputs are standard-normal floats (integers 0..9) with a fixed seed; a model
whose inputs have dynamic dimensions other than the batch needs real files.
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
    shape: list[int | None]  # None = dynamic


def input_specs(model: Any) -> list[InputSpec]:
    """The graph inputs that are not initializers, with numpy dtypes."""
    import numpy as np
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        specs.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)),
                               dims))
    return specs


def _batch_size(spec: InputSpec, batch: int) -> int:
    return batch if not spec.shape or spec.shape[0] is None else spec.shape[0]


def _split(arrays: dict[str, Any], specs: list[InputSpec], batch: int) -> list[dict]:
    step = _batch_size(specs[0], batch)
    total = len(next(iter(arrays.values())))
    return [
        {name: array[start:start + step] for name, array in arrays.items()}
        for start in range(0, total - step + 1, step)
    ]


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
    if len({len(a) for a in arrays.values()}) > 1:
        raise BadRequest("calibration inputs hold different numbers of samples")
    batches = _split(arrays, specs, batch) or [arrays]
    return Calibration(batches, f"{len(next(iter(arrays.values())))} samples from files")


def generate(specs: list[InputSpec], samples: int, batch: int, seed: int) -> Calibration:
    """Seeded inputs shaped like the model's, for models without calibration files."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        if any(d is None for d in spec.shape[1:]):
            raise BadRequest(
                f"input {spec.name!r} has dynamic dimensions besides the batch: "
                "give calibration files with --calibration"
            )
        shape = [samples * (spec.shape[0] or 1) if spec.shape else samples, *spec.shape[1:]]
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
