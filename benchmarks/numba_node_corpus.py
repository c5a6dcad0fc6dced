"""The ONNX backend node-test cases through the numba lowering.

Every case of ``onnx.backend.test.case.node`` whose graph uses at least one
operator with a registered numba kernel is lowered and run on its first data
set. Each case ends in one of: lowered and matching the reference (rtol 1e-3,
atol 1e-4), refused at load with a ``ModelLoadError`` naming the operator or
attribute, a wrong result, or a failure at run time (which the backend's
warm-up turns into a load error; the goal is none). Prints the counts and the
cases in the last two groups.

    python benchmarks/numba_node_corpus.py [NAME_PART ...]

With name parts, only the cases whose name contains one of them (e.g. ``conv``).
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    warnings.simplefilter("ignore")  # the case generators divide by zero on purpose
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "numba-corpus"))
    import numpy as np
    from onnx import numpy_helper
    from onnx.backend.test.case.node import collect_testcases

    from plugins.backends.numba_backend import kernel_registry
    from plugins.backends.numba_lowering import lower
    from runtime.errors import ModelLoadError
    from runtime.plugins import PluginManager

    def array(value):
        return numpy_helper.to_array(value) if hasattr(value, "data_type") else np.asarray(value)

    kernels = kernel_registry(PluginManager().load_plugins())
    known = set(kernels.names())
    counts: collections.Counter = collections.Counter()
    problems = []
    only = [part.lower() for part in sys.argv[1:]]
    for case in collect_testcases(None):
        if only and not any(part in case.name.lower() for part in only):
            continue
        model = case.model
        if not {n.op_type for n in model.graph.node} & known:
            continue
        counts["cases using an op with a kernel"] += 1
        try:
            graph = lower("case", model.SerializeToString(), kernels)
        except ModelLoadError:
            counts["refused at load, naming the op"] += 1
            continue
        inputs, outputs = case.data_sets[0]
        initializers = {t.name for t in model.graph.initializer}
        names_in = [i.name for i in model.graph.input if i.name not in initializers]
        names = [o.name for o in model.graph.output]
        try:
            got = graph.run(dict(zip(names_in, map(array, inputs))), names)
        except Exception as exc:  # the corpus is the test: report, go on
            counts["failed at run"] += 1
            problems.append(f"run {type(exc).__name__}: {case.name}")
            continue
        ok = all(np.asarray(got[n]).shape == array(o).shape and np.allclose(
            np.asarray(got[n]), array(o), rtol=1e-3, atol=1e-4, equal_nan=True)
            for n, o in zip(names, outputs))
        counts["lowered and match" if ok else "lowered, wrong result"] += 1
        if not ok:
            problems.append(f"wrong: {case.name}")
    for key, value in counts.items():
        print(f"{key}: {value}")
    for line in problems:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
