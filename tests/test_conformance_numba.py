"""Conformance: the ONNX backend node-test corpus through the numba backend (issue #17).

Every node test of the pinned onnx whose inputs and outputs V2 can carry
(tests/onnx_corpus.py) is loaded with ``backend = "numba"`` by one in-process runtime. Each
must either lower and give its reference outputs (the request goes through the binary
codec and ``Runtime.infer``, as a server's would) within the test's own tolerance, or be
refused at load with a message that names an op, an attribute or the element type it
cannot take: never a bare warm-up error, never a wrong answer.

The counts are printed (``-s``) and written as JSON where
``SHARDSERVE_CONFORMANCE_REPORT`` names a file; README.md quotes them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest
from onnx_corpus import CorpusUnavailable, compare_all, load_cases, model_name, v2_obstacle
from onnx_corpus import write_repository as write_corpus_repository

pytest.importorskip("numba")

# Exact cases (by test name) the numba work of issue #17 item 7 still has to fix, listed
# instead of failing the test; a listed case that passes fails it, so the list is trimmed as
# kernels land. Empty since the shape-subgraph kernels, named element types, training-mode
# Dropout and float16 refusals landed (2026-12-07).
PENDING: dict[str, set[str]] = {}
PENDING_CASES = {case: item for item, cases in PENDING.items() for case in cases}


def _names_the_cause(message: str, case) -> bool:
    """A refusal says what the kernels lack: an op type, an attribute, or an element type."""
    from onnx import TensorProto

    if any(op in message for op in case.op_types):
        return True
    attributes = {a.name for node in case.model.graph.node for a in node.attribute}
    if any(f"'{name}'" in message or f" {name}=" in message for name in attributes):
        return True
    lowered = message.lower()
    types = {TensorProto.DataType.Name(info.type.tensor_type.elem_type).lower()
             for info in (*case.model.graph.input, *case.model.graph.output)}
    return any(name in lowered for name in types)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold numba cache compiles every kernel signature the corpus uses
def test_onnx_node_corpus_through_numba_backend(tmp_path):
    from handlers.codec import decode_request, encode_request
    from plugins.backends.numba_backend import kernel_registry
    from runtime import Runtime  # the facade every edge calls
    from runtime.errors import ShardserveError

    started = time.monotonic()
    try:
        corpus = load_cases()
    except CorpusUnavailable as exc:
        pytest.fail(str(exc))
    cases = [case for case in corpus if v2_obstacle(case) is None]
    write_corpus_repository(cases, tmp_path, 'backend = "numba"\n')
    runtime = Runtime.from_config({"repository": {"path": str(tmp_path), "load": "none"}})
    runtime.start()
    kernels = set(kernel_registry(runtime.pm).names())

    counts: Counter = Counter()
    failures: dict[str, list[str]] = {}
    pending: dict[str, list[str]] = {}
    for case in cases:
        name = model_name(case.name)
        with_kernels = all(op in kernels for op in case.op_types)
        counts["all ops have a kernel"] += with_kernels
        problem = None
        try:
            runtime.load(name)
        except ShardserveError as exc:
            counts["refused at load"] += 1
            if not 400 <= exc.status < 500:
                problem = f"load: HTTP {exc.status}: {exc.message[:200]}"
            elif "warm-up" in exc.message or not _names_the_cause(exc.message, case):
                problem = f"refusal names no op, attribute or type: {exc.message[:200]}"
        except Exception as exc:  # a backend bug
            problem = f"load raised {type(exc).__name__}: {str(exc)[:200]}"
        else:
            body, headers = encode_request(case.inputs, binary=True,
                                           outputs=case.output_names)
            length = headers.get("Inference-Header-Content-Length")
            try:
                request = decode_request(body, int(length) if length else None)
                outputs = runtime.infer(name, request).outputs
                problem = compare_all(case, outputs)
            except ShardserveError as exc:
                problem = f"infer: HTTP {exc.status}: {exc.message[:200]}"
            except Exception as exc:
                problem = f"infer raised {type(exc).__name__}: {str(exc)[:200]}"
            finally:
                runtime.unload(name)  # compiled graphs and their buffers go with it
            if problem is None:
                counts["lowered and matched"] += 1
                counts["lowered and matched, all ops have a kernel"] += with_kernels
        if problem:
            item = PENDING_CASES.get(case.name)
            (pending if item else failures).setdefault(item or "numba", []).append(
                f"{case.name}: {problem}")
    runtime.close()

    report = {
        "onnx_node_tests": len(corpus),
        "v2_carriable": len(cases),
        "counts": dict(sorted(counts.items())),
        "failures": sum(len(v) for v in failures.values()),
        "pending_by_item": {k: len(v) for k, v in pending.items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    print("\nONNX node tests through numba:", json.dumps(report, indent=1))
    if os.environ.get("SHARDSERVE_CONFORMANCE_REPORT"):
        with open(os.environ["SHARDSERVE_CONFORMANCE_REPORT"], "w") as fh:
            json.dump({**report, "failure_list": failures, "pending": pending}, fh, indent=1)
    still = {line.split(": ")[0] for found in pending.values() for line in found}
    lines = [f"{cause} ({len(found)}):\n  " + "\n  ".join(found[:60])
             for cause, found in failures.items()]
    lines += [f"{key} ({item}) passes now: remove it from PENDING"
              for key, item in PENDING_CASES.items() if key not in still]
    assert not lines, "\n".join(lines)
