"""Cut shard models out of the original with onnx's own Extractor.

``onnx.utils.Extractor`` walks back from a shard's outputs to its inputs and
keeps only the nodes and initializers on the way, with the original's IR
version, opsets and local functions. Two additions: the walk also follows the
outer-scope references of If/Loop/Scan subgraphs (so their initializers come
along), and tensors without inferred type info get a value_info from a real run.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import BadRequest

from .graph import node_inputs

EXTERNAL_DATA_THRESHOLD = 1 << 30  # shards with more weight bytes than this use external data


def _extractor_class():
    import onnx.utils

    class ShardExtractor(onnx.utils.Extractor):
        """Extractor that treats a control-flow node's outer-scope reads as inputs."""

        def _dfs_search_reachable_nodes(self, node_output_name, graph_input_names, reachable):
            stack = [node_output_name]
            while stack:
                name = stack.pop()
                if name in graph_input_names or name not in self.outmap:
                    continue
                index = self.outmap[name]
                if index not in reachable:
                    reachable.add(index)
                    stack += node_inputs(self.graph.node[index])

        def _collect_reachable_tensors(self, nodes):
            names: set[str] = set()
            for node in nodes:
                names.update(node_inputs(node))
                names.update(node.output)
            initializer = [t for n, t in self.initializers.items() if n in names]
            value_info = [v for n, v in self.value_infos.items() if n in names]
            return initializer, value_info

    return ShardExtractor


def make_extractor(model, elem_types: dict[str, int], ranks: dict[str, int] | None = None):
    """An extractor over ``model`` (symbolic shapes inferred, so dynamic dims stay).

    A tensor inference left without a type gets one from ``elem_types``, and
    one without a shape (a Loop's output, say) gets ``ranks[name]`` unknown dims:
    a shard's inputs and outputs must have both to pass the checker.
    """
    import onnx
    from onnx import helper

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    ranks = ranks or {}
    g = inferred.graph
    known = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        known[vi.name] = vi
    for name, elem_type in elem_types.items():
        if name not in known:
            vi = helper.make_tensor_value_info(name, elem_type, None)
            g.value_info.append(vi)
            known[name] = g.value_info[-1]
    for name, vi in known.items():
        tensor = vi.type.tensor_type
        if tensor.elem_type and not tensor.HasField("shape") and name in ranks:
            tensor.shape.SetInParent()
            for _ in range(ranks[name]):
                tensor.shape.dim.add()
    return _extractor_class()(inferred)


def extract_shard(extractor, inputs: list[str], outputs: list[str]):
    return extractor.extract_model(list(inputs), list(outputs))


def save_shard(shard, directory: Path, filename: str, source_dir: Path) -> int:
    """Write one shard and check it fully; returns its bytes on disk.

    A source with external data gives shards with external data (read from
    ``source_dir`` now, written to ``<filename>.data``), as does any shard
    whose weights are over ``EXTERNAL_DATA_THRESHOLD``.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    external = any(uses_external_data(t) for t in shard.graph.initializer)
    if external:
        load_external_data_for_model(shard, str(source_dir))
    path = directory / filename
    size = sum(len(t.raw_data) for t in shard.graph.initializer)
    use_external = external or size > EXTERNAL_DATA_THRESHOLD
    if use_external:
        onnx.save_model(shard, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=filename + ".data", size_threshold=0)
    else:
        onnx.save_model(shard, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise BadRequest(f"shard {filename} failed onnx.checker: {first}") from None
    return os.path.getsize(path) + (
        os.path.getsize(str(path) + ".data") if use_external else 0)
