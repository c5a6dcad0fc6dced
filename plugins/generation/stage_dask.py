"""A decoder stage in a Dask actor (``placement = "dask"`` or ``"dask:WORKER"``).

The actor lives on one worker and holds the stage's onnxruntime session and KV caches there
(a :class:`~.split_engine.LayerStage`); the scheduler calls its methods like a local stage,
and Dask moves only the carried tensor. The cluster is the one ``[executors.dask]
scheduler`` names, as for the dask executor. A worker that dies takes the caches with it:
the call fails with a 503 naming the stage, or, with ``options.replicas`` (placements
``"dask"`` or ``"dask:WORKER"``, used in order), the stage moves to a fresh actor there (the
file is sent again; ``"dask"``, or a named worker that is gone, lets the scheduler pick a live
one) and the split engine rebuilds its caches from the tokens so far.
"""

from __future__ import annotations

import logging

import numpy as np

from runtime.errors import ServiceUnavailable

log = logging.getLogger("shardserve.generation")


class _Spec:
    def __init__(self, fields: dict):
        self.__dict__.update(fields)
        self.model = None


class StageActor:
    """On a worker: one stage and its caches."""

    def __init__(self, model_bytes: bytes, spec: dict):
        import onnxruntime as ort

        from .split_engine import LayerStage

        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        self.stage = LayerStage(_Spec(spec), session)

    def prefill(self, seq: str, start: int, carry: np.ndarray) -> np.ndarray:
        return self.stage.prefill(seq, start, carry)

    def decode(self, rows: list[str], carry: np.ndarray) -> np.ndarray:
        return self.stage.decode(rows, carry)

    def compute(self, carry: np.ndarray) -> np.ndarray:
        return self.stage.compute(carry)

    def release(self, seqs: list[str]) -> None:
        self.stage.release(seqs)

    def reset(self) -> None:
        self.stage.reset()

    def cache_bytes(self) -> int:
        return self.stage.cache_bytes()


class DaskStage:
    """The :class:`~.split_engine.LayerStage` API over a Dask actor."""

    def __init__(self, spec, model_bytes: bytes, scheduler: str, worker: str | None,
                 signature, timeout_s: float = 10.0, replicas: tuple[str | None, ...] = (),
                 reload=None):
        from plugins.executors.dask_executor import _client

        self.replicas = list(replicas)  # workers to fail over to (None: any), in order
        self.replica = 0
        self.spec, self.index = spec, spec.index
        self.past_names, self.present_names = spec.past_names, spec.present_names
        self.session = signature
        kv = [a for a in signature.get_inputs() if a.name.startswith("past_key_values.")]
        self.kv_shape = (kv[0].shape[1], kv[0].shape[3]) if kv else None
        self.dtype = np.float16 if kv and kv[0].type == "tensor(float16)" else np.float32
        self.scheduler, self.timeout_s = scheduler, timeout_s
        self.client = _client(scheduler)
        self._fields = {k: getattr(spec, k) for k in ("index", "inputs", "outputs", "carry_in",
                                                       "carry_out", "past_names",
                                                       "present_names", "layers")}
        # a fail-over sends the file again: read anew (``reload``) rather than kept here for
        # the stage's life (the scheduler need not hold every group's copy of the weights)
        self._reload = (reload or (lambda: model_bytes)) if replicas else None
        try:
            self._start(model_bytes, worker)
        except Exception:
            self.close()
            raise ServiceUnavailable(f"stage {self.index}: no Dask worker could host it") \
                from None

    def _start(self, model_bytes: bytes, worker: str | None, loose: bool = False) -> None:
        """A fresh actor for the stage on ``worker`` (any worker when None; ``loose``: any
        other when that one is gone)."""
        future = self.client.submit(StageActor, model_bytes, self._fields, actor=True,
                                    workers=[worker] if worker else None,
                                    allow_other_workers=loose and worker is not None,
                                    pure=False)
        with self.client.as_current():  # the actor proxy binds to this client
            self.actor = future.result(timeout=60)
        self._future = future

    def _fail_over(self) -> bool:
        """Move to the next replica's fresh actor (its caches start empty: the caller
        rebuilds them); False when none is left or none could host it."""
        while self.replicas:
            worker = self.replicas.pop(0)
            self.replica += 1
            try:
                self._start(self._reload(), worker, loose=True)
            except Exception as exc:
                log.warning("stage %s: replica %s (dask) could not start: %s", self.index,
                            self.replica, type(exc).__name__)
                continue
            log.warning("stage %s (dask) failed; now on replica %s", self.index, self.replica)
            return True
        return False

    def _call(self, method: str, *args):
        try:
            return getattr(self.actor, method)(*args).result(timeout=self.timeout_s)
        except ServiceUnavailable:
            raise
        except Exception as exc:
            from .split_engine import StageLost, UnknownSequence

            if type(exc).__name__ == "UnknownSequence":
                raise UnknownSequence(f"stage {self.index} (dask) holds no cache for a "
                                      "sequence of this batch") from None
            if self.client is not None and self._fail_over():
                raise StageLost(f"stage {self.index} (dask) failed; now on replica "
                                f"{self.replica}") from None
            raise ServiceUnavailable(f"stage {self.index} (dask) is unavailable: "
                                     f"{type(exc).__name__}") from None

    def prefill(self, seq: str, start: int, carry: np.ndarray) -> np.ndarray:
        return self._call("prefill", seq, start, carry)

    def decode(self, rows: list[str], carry: np.ndarray) -> np.ndarray:
        return self._call("decode", rows, carry)

    def compute(self, carry: np.ndarray) -> np.ndarray:
        return self._call("compute", carry)

    def release(self, seqs: list[str]) -> None:
        if seqs:
            self._call("release", seqs)

    def reset(self) -> None:
        self._call("reset")

    def cache_bytes(self) -> int:
        return int(self._call("cache_bytes"))

    def close(self) -> None:
        from plugins.executors.dask_executor import _release

        if self.client is not None:
            self.actor = self._future = None
            _release(self.scheduler)
            self.client = None
