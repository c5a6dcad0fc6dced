"""MLServer's side of benchmarks/serving.py: an ONNX model as a small custom ``MLModel``.

MLServer 1.7.1 ships no ONNX runtime, so this is the one users would write: one onnxruntime
session per model per inference worker (one intra-op thread, as shardserve and the bare app
use), inputs decoded and outputs encoded with MLServer's own ``NumpyCodec``. It runs only in
the benchmark's own virtual environment (benchmarks/.venv-mlserver, built by
``python benchmarks/serving.py --setup``); nothing in the project imports it.

model-settings.json: ``{"name": ..., "implementation": "mlserver_onnx.OnnxModel",
"parameters": {"uri": "/path/to/model.onnx"}}``
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, opts, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feed)
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(self._outputs, results)])
