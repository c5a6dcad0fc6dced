"""What a Lambda function needs at run time, read from the models it serves.

The serving path is pluggy, numpy, onnxruntime and orjson; everything else is added only when
a model asks for it (a numba shard, a tokenizer, a remote shard over HTTP, encrypted or signed
files, a BF16 tensor), so a function carries nothing it never imports.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CORE = ("pluggy", "numpy", "orjson")
# import name -> distributions to install (--no-deps: the closure is spelled out, so no unused
# extras such as onnxruntime's protobuf/sympy or tokenizers' huggingface_hub come along)
FEATURES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime",),
    "numba": ("numba", "llvmlite", "scipy"),  # scipy: numba's BLAS for np.dot
    "generate": ("tokenizers", "jinja2", "MarkupSafe"),
    "http": ("urllib3",),
    "cryptography": ("cryptography", "cffi", "pycparser"),
    "bf16": ("ml_dtypes",),
    "jwt": ("PyJWT",),
}
# boto3 and botocore ship with every AWS Lambda Python runtime: a lambda: placement adds none.


@dataclass
class FunctionNeeds:
    """The distributions a function needs and, per feature, the model that asked for it."""

    models: list[str]
    features: dict[str, str] = field(default_factory=dict)  # feature -> first model needing it

    @property
    def container(self) -> bool:
        """numba (llvmlite alone is 173 MB) ships as a container image, not a zip."""
        return "numba" in self.features

    def requirements(self) -> list[str]:
        names = list(CORE)
        for feature in sorted(self.features):
            names += [n for n in FEATURES[feature] if n not in names]
        return names


def _toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path.parent.name}/{path.name}: {exc}") from None


def _has_bf16(version: Path) -> bool:
    """Whether any ONNX file of ``version`` takes or returns a bfloat16 tensor (which the
    function reads through ml_dtypes); the graph's declared types, not the model.toml text."""
    try:
        import onnx  # package time only (the build extra): never shipped to the function
    except ImportError:  # pragma: no cover - then only model.toml's "BF16" text is read
        return False

    bf16 = onnx.TensorProto.BFLOAT16
    for path in sorted(version.glob("*.onnx")):
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception:  # noqa: BLE001 - encrypted or not ONNX: nothing to read here
            continue
        if any(v.type.tensor_type.elem_type == bf16 for v in [*graph.input, *graph.output]):
            return True
    return False


def _version_needs(model: str, config: dict, version: Path, found: dict[str, str]) -> None:
    if "bf16" not in found and _has_bf16(version):
        found.setdefault("bf16", model)
    plan = version / "plan.toml"
    if plan.is_file():
        for shard in _toml(plan).get("shards", []):
            backend = str(shard.get("backend", "onnxruntime"))
            found.setdefault("numba" if backend == "numba" else "onnxruntime", model)
            placement = str(shard.get("placement", "local"))
            if placement.startswith(("http:", "https:", "pool:")):  # pool: runs over http
                found.setdefault("http", model)
        if any(p.name.endswith((".dek", ".sig")) for p in version.iterdir()):
            found.setdefault("cryptography", model)
        return
    backend = str(config.get("backend", "onnxruntime"))
    found.setdefault("numba" if backend == "numba" else "onnxruntime", model)
    names = {p.name for p in version.iterdir()}
    if any(n.endswith((".dek", ".sig")) for n in names):  # encrypted or signed files
        found.setdefault("cryptography", model)


def _server_needs(config: Any, found: dict[str, str]) -> None:
    """The server config's own needs: an ``aes-gcm`` tensor transform imports cryptography."""
    section = config.section("executors") if hasattr(config, "section") else {}
    transforms = section.get("transforms", [])
    if isinstance(transforms, list) and "aes-gcm" in transforms:
        found.setdefault("cryptography", "[executors] transforms")


def function_needs(repository: Path, models: list[str] | None = None,
                   server_config: Any = None) -> FunctionNeeds:
    """What serving ``models`` (all of the repository's when None) from ``repository``
    needs, under ``server_config`` (a :class:`runtime.config.Config`) when given."""
    if not repository.is_dir():
        raise ConfigError("the model repository does not exist or is not a directory")
    available = sorted(p.name for p in repository.iterdir() if p.is_dir() and (
        (p / "model.toml").is_file() or any(v.name.isdigit() for v in p.iterdir())))
    chosen = available if not models else list(models)
    for name in chosen:
        if name not in available:
            raise ConfigError(f"model {name!r} is not in the repository")
    found: dict[str, str] = {}
    for name in chosen:
        toml = repository / name / "model.toml"
        config = _toml(toml) if toml.is_file() else {}
        text = toml.read_text(errors="replace") if toml.is_file() else ""
        if config.get("task") == "text-generation" or any(
                (repository / name).rglob("tokenizer.json")):
            found.setdefault("generate", name)
        if "BF16" in text:
            found.setdefault("bf16", name)
        if "preprocess" in config or "postprocess" in config:
            found.setdefault("numba", name)
        for version in sorted(p for p in (repository / name).iterdir() if p.is_dir()):
            _version_needs(name, config, version, found)
    if server_config is not None:
        _server_needs(server_config, found)
    return FunctionNeeds(chosen, found)
