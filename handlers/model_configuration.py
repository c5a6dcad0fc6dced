"""Triton's model configuration extension (``GET /v2/models/{m}[/versions/{v}]/config``): a
served version's configuration in Triton's JSON shape, plus its model.toml. Like the
classification extension, a detail of the protocol the edges speak, built from what the runtime
serves; the core itself only knows ``ModelConfig`` and ``TensorSpec``.
"""

from __future__ import annotations

from runtime import Runtime, TensorSpec


def model_config(rt: Runtime, name: str, version: str | int | None = None) -> dict:
    """The model version's configuration as Triton's ``/config`` route returns it."""
    model = rt.get_model(name, version)
    cfg = model.config

    def tensors(specs: list[TensorSpec]) -> list[dict]:
        out = [{"name": s.name, "data_type": "TYPE_" + s.datatype.replace("BYTES", "STRING"),
                "dims": s.shape[1 if cfg.max_batch_size else 0:]} for s in specs]
        for entry in out:  # scalars as Triton shows them: clients send [1], the model gets []
            if not entry["dims"]:
                entry.update(dims=[1], reshape={"shape": []})
        return out

    policy = {"latest": {"num_versions": cfg.num_versions}, "all": {},
              "specific": {"versions": cfg.versions}}[cfg.version_policy]
    return {
        "name": name,
        "platform": getattr(model.backend, "platform", cfg.backend),
        "backend": cfg.backend,
        "version_policy": {cfg.version_policy: policy},
        "max_batch_size": cfg.max_batch_size,
        "input": tensors(model.inputs),
        "output": tensors(model.outputs),
        "default_model_filename": cfg.filename,
        "parameters": {k: v for k, v in cfg.raw.items() if not isinstance(v, dict)},
        "backend_options": cfg.backend_options(),
    }
