"""Triton's classification extension: an output asked for with ``"parameters":
{"classification": k}`` comes back as the top ``k`` classes of its last axis, each a BYTES
string ``"score:index"`` (highest first; Triton adds ``:label`` when the model has a label
file, which a shardserve repository does not). A wrong value is a 400, never ignored.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BadRequest
from runtime.messages import InferRequest, InferResponse

PARAMETER = "classification"


def requested_classes(request: InferRequest) -> dict[str, int]:
    """Output name -> k for every output that asks for classification; checked before the
    model runs, so a malformed value costs no inference."""
    wanted = {}
    for output in request.outputs or ():
        if PARAMETER not in output.parameters:
            continue
        k = output.parameters[PARAMETER]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise BadRequest(f'output "{output.name[:128]}": "classification" must be a '
                             "positive integer (the number of classes to return)")
        wanted[output.name] = k
    return wanted


def classify(array: np.ndarray, k: int, name: str) -> np.ndarray:
    """The top ``k`` entries of the last axis as ``b"score:index"``, shape ``[..., min(k, C)]``."""
    if array.ndim == 0 or array.dtype.kind not in "fiub":
        raise BadRequest(f'output "{name[:128]}": classification needs a numeric output with '
                         "at least one dimension")
    k = min(k, array.shape[-1])
    order = np.argsort(-array.astype(np.float64), axis=-1, kind="stable")[..., :k]
    scores = np.take_along_axis(array, order, axis=-1)
    labels = [f"{float(score):f}:{int(index)}".encode()
              for score, index in zip(scores.reshape(-1).tolist(), order.reshape(-1).tolist())]
    return np.array(labels, dtype=object).reshape(order.shape)


def apply_classification(response: InferResponse, wanted: dict[str, int]) -> None:
    for name, k in wanted.items():
        if name in response.outputs:
            response.outputs[name] = classify(np.asarray(response.outputs[name]), k, name)
