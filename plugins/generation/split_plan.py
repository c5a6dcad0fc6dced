"""``shardserve partition LM --strategy pipeline|edge-cloud`` for a text-generation export.

A decoder is cut between its layers (:mod:`.split`), never inside one: the plan is an ordinary
``plan.toml`` DAG whose tensors are the original graph's (a stage reads the boundary tensor the
previous one writes, plus ``attention_mask`` / ``position_ids`` and its own pasts), so the
plan backend can still run it one-shot, and the generation plugin drives it as stages that each
keep their own KV cache. The tokenizer and config files are copied beside the shards.

- ``--strategy pipeline --shards K``: K stages of near-equal layer counts (boundary 0 puts the
  embedding alone, boundary L the LM head alone).
- ``--strategy edge-cloud [-o cut=B]``: two stages cut at boundary B (0..L), placed at
  ``--edge-placement`` (default local) and ``--cloud-placement`` (default local); without
  ``cut`` the planner (:mod:`.split_planner`) picks it from measured unit costs,
  ``--edge-factor``, ``--cloud-factor``, ``--bandwidth``, ``--rtt``, ``-o prompt_tokens=``
  and ``-o output_tokens=``.
- ``--strategy edge-cloud --private [-o cut=k]`` (or ``-o private=true``): the embedding, the
  first k layers and the LM head on the edge, the rest in the cloud (three stages), so no
  token id crosses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from runtime.errors import BadRequest

STRATEGIES = ("pipeline", "edge-cloud")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")
VERIFY_TOLERANCE = 1e-4


def decoder_source(repository: Path, model: str, version: int | None) -> Path | None:
    """The version folder to cut when ``model`` is a text-generation export, else None."""
    from runtime.repository import ModelRepository

    try:
        versions = ModelRepository(repository).versions(model)
    except Exception:
        return None
    for v in sorted(versions, reverse=True) if version is None else [version]:
        folder = repository / model / str(v)
        path = folder / "model.onnx"
        if not path.is_file() or (folder / "plan.toml").exists():
            continue
        if not (folder / "tokenizer.json").is_file():  # not served as a language model: cheap
            return None
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        names = {i.name for i in proto.graph.input}
        from .model import is_text_generation

        outs = [o.name for o in proto.graph.output]
        return folder if is_text_generation(list(names), outs) else None
    return None


def _int(options: dict, key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{key} must be an integer") from None


def is_private(options: dict) -> bool:
    """``--private`` / ``-o private=true``: a yes/no, anything else is a clear error."""
    value = str(options.get("private", "")).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise BadRequest(f"private must be true or false, got {options['private']!r}")


def _private_split(strategy: str, options: dict) -> bool:
    private = is_private(options)
    if private and strategy != "edge-cloud":
        raise BadRequest("--private keeps the ends of a language model on the edge: it needs "
                         "--strategy edge-cloud")
    return private


def partition_decoder(source: Path, strategy: str, options: dict,
                      target_version: int | None = None, verify: bool = True) -> Path:
    """Cut the export in ``source`` and publish the plan as a new version; returns its folder."""
    import onnx

    from plugins.partitioners.build import dump_plan, io_specs, next_version, publish_version
    from plugins.partitioners.costs import file_sha256
    from plugins.partitioners.extract import save_shard
    from plugins.shard_plan import PLAN_FILE, PLAN_FORMAT, parse_plan

    from .split import DecoderGraph, plan_stages, split_decoder

    if strategy not in STRATEGIES:
        raise BadRequest(f"a text-generation model is cut with --strategy "
                         f"{' or '.join(STRATEGIES)}")
    private = _private_split(strategy, options)
    path = source / "model.onnx"
    proto = onnx.load(str(path))
    layers = len(DecoderGraph(proto).layers)
    placements: list[str]
    predicted: dict = {}
    if strategy == "pipeline":
        shards = _int(options, "shards") or 2
        cuts = plan_stages(layers, shards=shards)
        placements = [str(options.get("placement") or "local")] * (len(cuts) + 1)
    else:
        cut = _int(options, "cut")
        edge = str(options.get("edge_placement") or "local")
        cloud = str(options.get("cloud_placement") or "local")
        if private:
            # The embedding, layers 0..cut-1 and the LM head stay on the edge: token ids and
            # text never leave it, only hidden states cross (both ways).
            if cut is None:
                cut = choose_cut(proto, options, private=True, report=predicted)
            if not 1 <= cut < layers:
                raise BadRequest(f"a private split keeps 1 to {layers - 1} layers on the edge "
                                 "(with none, the cloud would see the token embeddings)")
            cuts = plan_stages(layers, cuts=[cut, layers])
            placements = [edge, cloud, edge]
        else:
            cuts = plan_stages(layers, cuts=[cut if cut is not None else choose_cut(
                proto, options, private=False, report=predicted)])
            placements = [edge, cloud]
    stages = split_decoder(proto, cuts)
    model_dir = source.parent
    version = target_version or next_version(model_dir.parent, model_dir.name)
    target = model_dir / str(version)
    if target.exists():
        raise BadRequest(f"version {version} already exists")
    inputs, outputs = io_specs(path)
    with publish_version(model_dir, target, f"version {version}") as tmp:
        shard_tables = []
        for stage, placement in zip(stages, placements):
            filename = f"shard_{stage.index}.onnx"
            size = save_shard(stage.model, tmp, filename, source)
            shard_tables.append({"name": f"stage_{stage.index}", "file": filename,
                                 "inputs": stage.inputs, "outputs": stage.outputs,
                                 "layers": stage.layers, "file_bytes": size,
                                 "backend": "onnxruntime", "placement": placement})
        plan = {"format": PLAN_FORMAT, "strategy": strategy, "mode": "dag",
                "source_version": int(source.name), "source_file": path.name,
                "source_sha256": file_sha256(path), "inputs": inputs, "outputs": outputs,
                "decoder": {"layers": layers, "cuts": cuts, **kv_signature(path)},
                "options": {k: v for k, v in options.items() if v is not None},
                **({"predicted": predicted} if predicted else {}),
                "shards": shard_tables}
        text = dump_plan(plan)
        parse_plan(model_dir.name, text.encode())
        (tmp / PLAN_FILE).write_text(text)
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
        if verify:
            verify_stages(path, tmp, stages)
    return target


def probe_feed(session, batch: int = 2, seq: int = 3, past: int = 4, seed: int = 0) -> dict:
    """Seeded inputs for a decoder session: a prefill over a random past."""
    rng = np.random.default_rng(seed)
    feed = {}
    for arg in session.get_inputs():
        int_type = np.int32 if arg.type == "tensor(int32)" else np.int64
        if arg.name == "input_ids":
            feed[arg.name] = rng.integers(0, 16, (batch, seq)).astype(int_type)
        elif arg.name == "attention_mask":
            feed[arg.name] = np.ones((batch, past + seq), int_type)
        elif arg.name == "position_ids":
            feed[arg.name] = np.tile(np.arange(past, past + seq, dtype=int_type), (batch, 1))
        else:
            dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
            feed[arg.name] = rng.standard_normal((batch, arg.shape[1], past, arg.shape[3])
                                                 ).astype(dtype)
    return feed


def verify_stages(path: Path, folder: Path, stages: list) -> None:
    """Chain the written stages on seeded inputs; logits and presents must equal the
    original's (within 1e-4), or nothing is published."""
    import onnxruntime as ort

    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in whole.get_outputs()]
    feed = probe_feed(whole)
    expected = dict(zip(names, whole.run(names, feed)))
    tensors = dict(feed)
    for stage in stages:
        sess = ort.InferenceSession(str(folder / f"shard_{stage.index}.onnx"),
                                    providers=["CPUExecutionProvider"])
        out = sess.run(stage.outputs, {n: tensors[n] for n in stage.inputs})
        tensors.update(zip(stage.outputs, out))
    for name in names:
        if not np.allclose(expected[name], tensors[name], rtol=VERIFY_TOLERANCE,
                           atol=VERIFY_TOLERANCE):
            raise BadRequest(f"the split's output {name!r} differs from the original model's; "
                             "nothing was written")


def kv_signature(path: Path) -> dict:
    """What a scheduler needs to drive a remote stage without its file: the KV heads, head
    size and type, and which index inputs the export declares as int32."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args = session.get_inputs()
    past = next(a for a in args if a.name.startswith("past_key_values."))
    return {"kv_heads": int(past.shape[1]), "head_dim": int(past.shape[3]), "kv_type": past.type,
            "int32_inputs": [a.name for a in args if a.type == "tensor(int32)"]}


def choose_cut(proto, options: dict, private: bool, report: dict) -> int:
    """The edge-cloud planner's cut (docs/partitioning.md), from unit costs measured here;
    ``report`` receives the prediction written to plan.toml."""
    plan = plan_from_options(proto, options, private)
    report.update({"cut": plan["cut"], **plan["predicted"],
                   "edge_only_token_s": plan["edge_only"]["token_s"]})
    return plan["cut"]


def plan_from_options(proto, options: dict, private: bool) -> dict:
    """:func:`~.split_planner.plan_cut` over units measured here, priced with the command's
    options (``--edge-factor``, ``--cloud-factor``, ``--bandwidth``, ``--rtt``,
    ``-o prompt_tokens= output_tokens= call_overhead= step_overhead=``)."""
    from plugins.partitioners.partition import option

    from .split_planner import CALL_OVERHEAD_S, STEP_OVERHEAD_S, measure_units, plan_cut

    prompt = int(option(options, "prompt_tokens", 64))
    return plan_cut(measure_units(proto, prompt=prompt),
                    edge_factor=float(option(options, "edge_factor", 4.0)),
                    cloud_factor=float(option(options, "cloud_factor", 1.0)),
                    bandwidth_bps=float(option(options, "bandwidth", 10e6, "bps")),
                    rtt_s=float(option(options, "rtt", 0.02, "s")), prompt=prompt,
                    output=int(option(options, "output_tokens", 64)), private=private,
                    call_s=float(option(options, "call_overhead", CALL_OVERHEAD_S, "s")),
                    step_s=float(option(options, "step_overhead", STEP_OVERHEAD_S, "s")))


def plan_decoder(source: Path, strategy: str, options: dict) -> dict:
    """``shardserve plan LM -s edge-cloud``: the planner's candidate cuts, nothing written."""
    import onnx

    private = _private_split(strategy, options)
    if strategy != "edge-cloud":
        raise BadRequest("shardserve plan prices a language model's cuts with "
                         "--strategy edge-cloud")
    return plan_from_options(onnx.load(str(source / "model.onnx")), options, private)


def format_decoder_plan(plan: dict) -> str:
    lines = [f"{'cut':>4} {'TTFT ms':>9} {'ms/token':>9} {'tokens/s':>9} {'bytes/token':>12}"]
    for row in plan["candidates"]:
        mark = " <- chosen" if row["cut"] == plan["cut"] else ""
        lines.append(f"{row['cut']:>4} {1e3 * row['ttft_s']:>9.2f} {1e3 * row['token_s']:>9.3f} "
                     f"{row['tokens_per_s']:>9.1f} {row['bytes_per_token']:>12}{mark}")
    edge = plan["edge_only"]
    lines.append(f"edge only: TTFT {1e3 * edge['ttft_s']:.2f} ms, "
                 f"{1e3 * edge['token_s']:.3f} ms/token")
    return "\n".join(lines)
