"""Representative inputs for the build tools: ``plan``, ``partition``, ``optimize``, ``bench``.

One place turns (a model's input signature, ``--sample FILE.npz`` files,
``--input-shape NAME=D1,D2,...`` overrides, model.toml's ``[sample]`` table)
into input dicts, so that cost measurement, plan verification, calibration and
latency all run the model on the same, realistic inputs. Inventing inputs
(every dynamic dim 1, every integer 0) is what makes a reflect-Pad or an
``If`` on a sample-rate input crash, and costs come out 10-200x off.

Without samples or shapes, dynamic dims are sized from the model's own hints:
the dim's name (batch, sequence, height, width, channels, ...), its
position (the first dim of a rank >= 1 input is the batch) or the layout
(224 for the spatial dims of a float [N, 3, H, W] or [N, H, W, 3] input, 128
for the second dim of integer [N, S] token ids). A dynamic dim with no usable
hint stops the command with a message naming it. Negative
``dim_value`` (Paddle exports) counts as dynamic.

Only numpy is imported at module level; onnx only by :func:`onnx_signature`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import BadRequest

SEQUENCE_LENGTH = 128
IMAGE_SIDE = 224
# (pattern over a lower-cased dim name, size; None = the batch)
DIM_HINTS: tuple[tuple[re.Pattern, int | None], ...] = (
    (re.compile(r"(^|_)(n|b|bs|batch|batch_?size|batches|num_samples)$|^batch"), None),
    (re.compile(r"seq|sequence|token|length|^len$|_len$|^s$|^l$|^t$|time|frames|steps"),
     SEQUENCE_LENGTH),
    (re.compile(r"height|width|^h$|^w$|^img_?[hw]$"), IMAGE_SIDE),
    (re.compile(r"channel|^c$"), 3),
)


@dataclass(frozen=True)
class InputSignature:
    """One model input: numpy dtype, shape (None = dynamic) and the dims' names."""

    name: str
    dtype: Any
    shape: tuple[int | None, ...]
    dim_names: tuple[str | None, ...] = ()

    def dynamic_dims(self) -> list[str]:
        names = list(self.dim_names) + [None] * (len(self.shape) - len(self.dim_names))
        return [f"{self.name}[{i}]" + (f" ({names[i]})" if names[i] else "")
                for i, d in enumerate(self.shape) if d is None]


def onnx_signature(model: Any) -> list[InputSignature]:
    """The real inputs of an ONNX model (initializers listed as inputs are not)."""
    import numpy as np
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = list(tt.shape.dim)
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                      for d in dims)
        names = tuple(d.dim_param or None for d in dims)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = np.dtype(object)
        out.append(InputSignature(vi.name, dtype, shape, names))
    return out


def metadata_signature(metadata: dict) -> list[InputSignature]:
    """The inputs of a V2 model-metadata document (``-1`` = dynamic)."""
    import numpy as np

    from runtime.dtypes import to_numpy_dtype

    out = []
    for spec in metadata.get("inputs", []):
        dtype = np.dtype(object) if spec["datatype"] == "BYTES" else to_numpy_dtype(
            spec["datatype"])
        out.append(InputSignature(spec["name"], dtype,
                                  tuple(d if d >= 0 else None for d in spec["shape"])))
    return out


def add_sample_arguments(parser: Any) -> None:
    """``--sample`` and ``--input-shape``: the same options on ``plan``, ``partition``,
    ``optimize`` and ``bench``."""
    parser.add_argument("--sample", action="append", metavar="FILE.npz",
                        help="representative inputs, one array per input name; repeat, or give "
                        "a directory of .npz files (default: model.toml [sample], else "
                        "generated)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="size of an input's dynamic dims for generated inputs (repeatable)")


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """``NAME=D1,D2,...`` (``NAME=`` or ``NAME=scalar`` for rank 0)."""
    name, sep, dims = str(text).rpartition("=")
    if not sep or not name:
        raise BadRequest(f"--input-shape expects NAME=D1,D2,..., got {text!r}")
    return name, _dims(name, dims)


def _dims(name: str, value: Any) -> list[int]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif str(value).strip().lower() in ("", "scalar", "[]"):
        items = []
    else:
        items = [v.strip() for v in str(value).strip("[]() ").replace("x", ",").split(",")]
    try:
        dims = [int(v) for v in items]
    except (TypeError, ValueError):
        raise BadRequest(f"input shape of {name!r}: dims must be integers, got {value!r}"
                         ) from None
    if any(d < 0 for d in dims):
        raise BadRequest(f"input shape of {name!r}: dims must be >= 0, got {dims}")
    return dims


@dataclass
class SampleOptions:
    """What the user gave: sample files (or directories of them) and shape overrides."""

    files: list[Path] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def given(self) -> bool:
        return bool(self.files or self.shapes)


def sample_options(sample: list[str] | None = None, input_shape: list[str] | None = None,
                   model_raw: dict | None = None, model_dir: Path | None = None
                   ) -> SampleOptions:
    """Command-line values over model.toml's ``[sample]`` (``files``, ``shapes``).

    ``files`` in model.toml are relative to the model's directory.
    """
    table = (model_raw or {}).get("sample", {})
    if not isinstance(table, dict):
        raise BadRequest("model.toml key 'sample' must be a table (files = [...], shapes = {...})")
    unknown = sorted(set(table) - {"files", "shapes"})
    if unknown:
        raise BadRequest(f"model.toml [sample] has no key {unknown[0]!r} (keys: files, shapes)")
    files_cfg = table.get("files", [])
    if isinstance(files_cfg, str):
        files_cfg = [files_cfg]
    if not isinstance(files_cfg, list) or not all(isinstance(f, str) for f in files_cfg):
        raise BadRequest("model.toml [sample] files must be a file name or a list of them")
    shapes_cfg = table.get("shapes", {})
    if not isinstance(shapes_cfg, dict):
        raise BadRequest("model.toml [sample] shapes must be a table: NAME = [D1, D2, ...]")
    shapes = {name: _dims(name, dims) for name, dims in shapes_cfg.items()}
    for text in input_shape or []:
        name, dims = parse_input_shape(text)
        shapes[name] = dims
    if sample:
        files = [Path(f) for f in sample]
    else:
        base = model_dir or Path(".")
        files = [base / f for f in files_cfg]
    return SampleOptions(files, shapes)


def read_sample_files(paths: list[Path]) -> list[dict]:
    """One dict of arrays per ``.npz`` file; a directory stands for its ``*.npz`` (sorted)."""
    import numpy as np

    expanded: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.npz"))
            if not found:
                raise BadRequest(f"sample directory {path.name!r} holds no .npz file")
            expanded += found
        elif path.is_file():
            expanded.append(path)
        else:
            raise BadRequest(f"sample file {path.name!r} does not exist")
    feeds = []
    for path in expanded:
        try:
            with np.load(path, allow_pickle=False) as data:
                feeds.append({key: data[key] for key in data.files})
        except (OSError, ValueError, EOFError) as exc:
            raise BadRequest(f"sample file {path.name!r} is not a readable .npz "
                             f"({type(exc).__name__})") from None
    return feeds


class Samples:
    """Input dicts for one model: the sample files, checked, or generated at resolved shapes.

    ``batch`` sizes a dynamic batch dim when nothing else does; ``max_batch_size``
    (model.toml) caps it.
    """

    def __init__(self, signature: list[InputSignature], options: SampleOptions | None = None,
                 batch: int = 1, max_batch_size: int = 0, strict: bool = True):
        self.signature = signature
        self.options = options or SampleOptions()
        self.batch = max(1, min(batch, max_batch_size) if max_batch_size else batch)
        self.guessed: list[str] = []  # "x[1] (seq) = 128" for the report
        self.missing: list[str] = []  # dynamic dims without a size (only when not strict)
        self.strict = strict
        names = {s.name for s in signature}
        unknown = sorted(set(self.options.shapes) - names)
        if unknown:
            raise BadRequest(f"--input-shape names {unknown[0]!r}, which is not a model input "
                             f"(inputs: {', '.join(sorted(names)) or 'none'})")
        self.files = [self._check(feed, i) for i, feed in
                      enumerate(read_sample_files(self.options.files))]
        self.shapes = self._resolve()

    # -- checking ---------------------------------------------------------------
    def _check(self, feed: dict, index: int) -> dict:
        import numpy as np

        where = f"sample {index + 1}"
        names = {s.name for s in self.signature}
        extra = sorted(set(feed) - names)
        if extra:
            raise BadRequest(f"{where}: array {extra[0]!r} is not a model input "
                             f"(inputs: {', '.join(sorted(names))})")
        out = {}
        for spec in self.signature:
            if spec.name not in feed:
                raise BadRequest(f"{where}: no array named {spec.name!r}")
            array = np.asarray(feed[spec.name])
            if array.dtype != spec.dtype:
                same_kind = (array.dtype.kind in "f" and spec.dtype.kind == "f") or (
                    array.dtype.kind in "iu" and spec.dtype.kind in "iu")
                if not same_kind:
                    raise BadRequest(f"{where}: {spec.name!r} has dtype {array.dtype}, "
                                     f"the model expects {spec.dtype}")
                array = array.astype(spec.dtype)
            if array.ndim != len(spec.shape) or any(
                    d is not None and d != got for d, got in zip(spec.shape, array.shape)):
                want = "a scalar (rank 0)" if not spec.shape else "[" + ", ".join(
                    "?" if d is None else str(d) for d in spec.shape) + "]"
                raise BadRequest(f"{where}: {spec.name!r} has shape {list(array.shape)}, "
                                 f"the model expects {want}")
            out[spec.name] = np.require(array, requirements="C")  # keeps rank 0
        return out

    def _resolve(self) -> dict[str, list[int]]:
        shapes: dict[str, list[int]] = {}
        missing: list[str] = []
        for spec in self.signature:
            if spec.name in self.options.shapes:
                dims = self.options.shapes[spec.name]
                if len(dims) != len(spec.shape) or any(
                        d is not None and d != got for d, got in zip(spec.shape, dims)):
                    want = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
                    raise BadRequest(f"--input-shape {spec.name}={','.join(map(str, dims))} "
                                     f"does not fit the model's {want}")
                shapes[spec.name] = dims
                continue
            if self.files:
                shapes[spec.name] = list(self.files[0][spec.name].shape)
                continue
            dims = []
            names = list(spec.dim_names) + [None] * (len(spec.shape) - len(spec.dim_names))
            for i, d in enumerate(spec.shape):
                if d is not None:
                    dims.append(d)
                    continue
                size = _hinted(names[i], i, self.batch)
                if size is None:
                    size = _convention(spec, i)
                if size is None:
                    missing.append(f"{spec.name}[{i}]" + (f" ({names[i]})" if names[i] else ""))
                    size = 1
                else:
                    self.guessed.append(f"{spec.name}[{i}]"
                                        + (f" ({names[i]})" if names[i] else "") + f" = {size}")
                dims.append(size)
            shapes[spec.name] = dims
        self.missing = missing
        if missing and self.strict:
            example = self.signature[0].name
            raise BadRequest(
                "cannot choose a size for the dynamic dim(s) " + ", ".join(missing)
                + f": give representative inputs with --sample FILE.npz, or sizes with "
                f"--input-shape {example}=D1,D2,... (or [sample] in model.toml)")
        return shapes

    # -- inputs -------------------------------------------------------------------
    @property
    def from_files(self) -> bool:
        return bool(self.files)

    def feed(self, seed: int = 0) -> dict:
        """One input dict: the first sample file (seed 0), else seeded values at the shapes.

        Generated integers copy the first sample file's values when there is one
        (token ids, a sample rate), else they are 0 (a valid index anywhere).
        """
        if self.files and seed == 0:
            return dict(self.files[0])
        return self.generate(seed)

    def generate(self, seed: int, int_high: int = 1, batch: int | None = None) -> dict:
        import numpy as np

        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.signature:
            shape = list(self.shapes[spec.name])
            if batch is not None and spec.shape and spec.shape[0] is None:
                shape[0] = batch
            template = self.files[0][spec.name] if self.files else None
            if spec.dtype.kind == "f":
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif template is not None and spec.dtype.kind in "iub":
                feeds[spec.name] = _resized(template, shape)
            elif spec.dtype.kind == "b":
                feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            elif spec.dtype.kind in "iu":
                feeds[spec.name] = rng.integers(0, int_high, size=shape).astype(spec.dtype)
            elif spec.dtype.kind == "O":
                feeds[spec.name] = np.full(shape, b"x", dtype=object)
            else:
                raise BadRequest(f"input {spec.name!r}: cannot generate {spec.dtype} data")
        return feeds

    def with_batch(self, feed: dict, batch: int) -> dict:
        """``feed`` with every dynamic batch dim grown (cycled) or cut to ``batch`` rows."""
        import numpy as np

        out = dict(feed)
        for spec in self.signature:
            if spec.shape and spec.shape[0] is None and out[spec.name].shape[0] != batch:
                array = out[spec.name]
                rows = np.arange(batch) % max(array.shape[0], 1)
                out[spec.name] = np.require(array[rows], requirements="C")
        return out

    def describe(self) -> str:
        if self.files:
            return f"{len(self.files)} sample file(s)"
        text = ", ".join(f"{n}={'x'.join(map(str, s)) or 'scalar'}"
                         for n, s in self.shapes.items())
        return f"generated inputs at {text}" if text else "generated inputs"

    def failure(self, exc: BaseException, what: str = "the model",
                inputs: str | None = None) -> BadRequest:
        """A clear error for an onnxruntime failure on these inputs (never its traceback);
        ``inputs`` names other inputs that were used (the calibration files)."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"(/[^\s:'\"]+)+", "<path>", first)[:200]
        if self.files or inputs:
            return BadRequest(f"{what} failed on {inputs or 'the sample inputs'}: {first}")
        dynamic = [d for s in self.signature for d in s.dynamic_dims()]
        hint = (f"set the dynamic dim(s) {', '.join(dynamic)} with --input-shape NAME=D1,D2,... "
                "or give representative inputs with --sample FILE.npz"
                if dynamic else "give representative inputs with --sample FILE.npz")
        ints = [s.name for s in self.signature if s.dtype.kind in "iu"]
        values = f"; integer inputs ({', '.join(ints)}) were 0" if ints else ""
        return BadRequest(f"{what} failed on generated inputs ({self.describe()}{values}): "
                          f"{first}; {hint}")


def _hinted(name: str | None, position: int, batch: int) -> int | None:
    if name:
        lowered = name.lower()
        if not re.fullmatch(r"unk__\d+|dynamic.*|\?", lowered):
            for pattern, size in DIM_HINTS:
                if pattern.search(lowered):
                    return batch if size is None else size
    return batch if position == 0 else None


def _convention(spec: InputSignature, position: int) -> int | None:
    """Sizes from the layout alone: the spatial dims of an image batch ([N, 3, H, W] or
    [N, H, W, 3], float) and the sequence of token ids ([N, S], integer)."""
    shape = spec.shape
    if len(shape) == 4 and spec.dtype.kind == "f":
        if shape[1] in (1, 3) and position in (2, 3):
            return IMAGE_SIDE
        if shape[3] in (1, 3) and position in (1, 2):
            return IMAGE_SIDE
    if len(shape) == 2 and spec.dtype.kind in "iu" and position == 1:
        return SEQUENCE_LENGTH
    return None


def _resized(template: Any, shape: list[int]) -> Any:
    """``template``'s values laid out in ``shape`` (cycled), same dtype."""
    import numpy as np

    if list(template.shape) == list(shape):
        return template.copy()
    flat = template.reshape(-1)
    if flat.size == 0:
        return np.zeros(shape, dtype=template.dtype)
    return np.resize(flat, shape).astype(template.dtype)


def samples_for_model(model: Any, options: SampleOptions | None = None, batch: int = 1,
                      max_batch_size: int = 0) -> Samples:
    """:class:`Samples` over an ONNX model's inputs."""
    return Samples(onnx_signature(model), options, batch, max_batch_size)
