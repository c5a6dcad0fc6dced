"""Serving a decoder plan (plan.toml with a ``[decoder]`` split) as split stages.

The generation model calls :func:`stages_of_plan` when the backend it wraps is a plan: each
shard becomes a stage where its placement says (in process, another shardserve, a Dask actor,
a Lambda function),
:class:`StageSignature` shows the whole decoder's inputs and outputs as one session would, and
:func:`stages_engine` builds the scheduler over the stages.
"""

from __future__ import annotations

from .engine import EngineLimits, GraphInfo
from .split_engine import LayerStage, SplitEngine, engine_over


class PlanStageSpec:
    """A stage as a plan.toml shard describes it (its first input and output are the carried
    tensors, its other outputs its layers' presents)."""

    def __init__(self, index: int, shard):
        self.index = index
        self.inputs, self.outputs = list(shard.inputs), list(shard.outputs)
        self.carry_in, self.carry_out = shard.inputs[0], shard.outputs[0]
        self.present_names = [n for n in shard.outputs[1:] if n.startswith("present.")]
        self.past_names = ["past_key_values." + n[len("present."):] for n in self.present_names]
        self.layers = sorted({int(n.split(".")[1]) for n in self.present_names})
        self.model = None


class StageGroups(list):
    """The first group's stages (what the signature is read from), with ``groups``: every
    pipeline group's own stages, the first included."""

    groups: list[list]


def stages_of_plan(settings) -> StageGroups:
    """Stages over a decoder plan's shard files, as plan.toml lists them (the plan backend may
    have fused them), read through the model-bytes hooks so signatures and encryption apply to
    every shard; one set per pipeline group (:func:`pipeline_groups`), in-process ones sharing
    one session per shard."""
    from plugins.shard_plan import PLAN_FILE, parse_plan
    from runtime.errors import ModelLoadError

    plan = parse_plan(settings.model, settings.read_bytes(PLAN_FILE))
    if not isinstance(plan.raw.get("decoder"), dict):
        raise ModelLoadError(f"model {settings.model!r}: this plan does not cut the decoder "
                             "between its layers; generating needs shardserve partition's "
                             "decoder split (docs/partitioning.md)")
    sessions: dict[str, object] = {}
    stages = StageGroups(_stage_group(settings, plan, sessions))
    stages.groups = [stages] + [_stage_group(settings, plan, sessions)
                                for _ in range(pipeline_groups(settings.model, plan) - 1)]
    return stages


def pipeline_groups(model: str, plan) -> int:
    """plan.toml ``[decoder] pipeline_groups``; by default one group per stage when the stages
    run in more than one place (pipelining keeps them all busy), else 1 (all in this process:
    one batch is as fast and needs no extra threads)."""
    from runtime.errors import ModelLoadError

    value = plan.raw["decoder"].get("pipeline_groups")
    if value is None:
        return len(plan.shards) if len({s.placement for s in plan.shards}) > 1 else 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise ModelLoadError(f"model {model!r}: plan.toml [decoder] pipeline_groups must be "
                             "an integer from 1 to 16")
    return value


def _stage_group(settings, plan, sessions: dict) -> list[LayerStage]:
    """One stage per shard, where its placement says."""
    import onnxruntime as ort

    from plugins.backends.onnxruntime import session_options
    from runtime.errors import ModelLoadError

    stages = []
    chain = None
    for index, shard in enumerate(plan.shards):
        spec = PlanStageSpec(index, shard)
        if shard.placement == "dask" or shard.placement.startswith("dask:"):
            stages.append(dask_stage(settings, plan, shard, spec))
            continue
        if shard.placement.startswith(("http://", "https://")):
            if chain is None:
                from plugins.executors.base import TransformChain

                names = settings.server.section("executors").get("transforms", []) \
                    if settings.server else []
                chain = TransformChain(names, settings.plugins, settings.server)
            stages.append(remote_stage(settings.model, plan, shard, spec, chain))
            continue
        if shard.placement.startswith("lambda:"):
            from .stage_lambda import lambda_stage

            stages.append(lambda_stage(settings, plan, shard, spec))
            continue
        if shard.placement != "local" or shard.backend != "onnxruntime":
            raise ModelLoadError(f"model {settings.model!r}: decoder stages run in process, "
                                 "on another shardserve, in a Dask actor or in a Lambda "
                                 "function (placement 'local', 'http://...', "
                                 "'dask[:worker]' or 'lambda:function')")
        if shard.file not in sessions:  # model.toml's [onnxruntime] (threads) applies
            sessions[shard.file] = ort.InferenceSession(
                _stage_bytes(settings, shard.file),
                session_options(settings.model, settings.config.raw.get("onnxruntime", {})),
                providers=["CPUExecutionProvider"])
        stages.append(LayerStage(spec, sessions[shard.file]))
    return stages


def _stage_bytes(settings, filename: str) -> bytes:
    """A stage's model bytes as its session should load them (the attention rewrite the whole
    model gets: docs/generation.md)."""
    from .graph_rewrite import for_session

    return for_session(settings, settings.read_bytes(filename), filename)


class _Arg:
    def __init__(self, name: str, type_: str, shape: list):
        self.name, self.type, self.shape = name, type_, shape


class StageSignature:
    """The whole decoder's inputs and outputs as an onnxruntime session would list them, read
    from its stages (what the generation model checks a graph by)."""

    def __init__(self, stages: list[LayerStage]):
        carried = {s.spec.carry_in for s in stages[1:]}
        self._inputs, self._outputs, seen = [], [], set()
        for stage in stages:
            for arg in stage.session.get_inputs():
                if arg.name not in carried and arg.name not in seen:
                    seen.add(arg.name)
                    self._inputs.append(_Arg(arg.name, arg.type, arg.shape))
            for arg in stage.session.get_outputs():
                if arg.name == "logits" or arg.name.startswith("present."):
                    self._outputs.append(_Arg(arg.name, arg.type, arg.shape))

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs


def stages_engine(stages: list[LayerStage]):
    """An engine factory with :class:`~.engine.Engine`'s signature, over ``stages``."""

    def make(session, graph: GraphInfo, limits: EngineLimits, name: str) -> SplitEngine:
        return engine_over(getattr(stages, "groups", [stages]), graph, limits, name)

    return make


def remote_stage(model: str, plan, shard, spec, chain=None):
    """A stage on another shardserve; its signature comes from plan.toml's ``[decoder]``."""
    from plugins.executors.remote import _split_placement
    from runtime.errors import ModelLoadError

    from .stage_client import RemoteStage

    inputs, outputs = plan_signature(model, plan, spec)
    endpoint, remote = _split_placement(shard.placement)
    options = shard.options
    replicas = options.get("replicas", [])
    if not isinstance(replicas, list) or not all(
            isinstance(r, str) and r.startswith(("http://", "https://")) for r in replicas):
        raise ModelLoadError(f"model {model!r}: shard {shard.name!r} options.replicas must be "
                             "a list of http(s):// endpoints")
    stage = RemoteStage(spec, endpoint, remote or f"{model}.{shard.name}", inputs, outputs,
                        timeout_s=float(options.get("timeout_s", 10.0)), chain=chain,
                        replicas=tuple(replicas))
    stage.orders_own_calls = True  # pipeline groups call it at once (split_pipeline.py)
    return stage


def dask_stage(settings, plan, shard, spec):
    """A stage in a Dask actor on the ``[executors.dask] scheduler`` cluster."""
    from runtime.errors import ModelLoadError

    from .stage_client import _Signature
    from .stage_dask import DaskStage

    section = settings.server.section("executors") if settings.server else {}
    dask = section.get("dask", {}) if isinstance(section, dict) else {}
    scheduler = dask.get("scheduler") if isinstance(dask, dict) else None
    if not isinstance(scheduler, str) or not scheduler:
        raise ModelLoadError(f"model {settings.model!r}: a decoder stage on Dask needs "
                             "[executors.dask] scheduler")
    worker = shard.placement.partition(":")[2] or None
    replicas = shard.options.get("replicas", [])
    if not isinstance(replicas, list) or not all(
            isinstance(r, str) and (r == "dask" or r.startswith("dask:")) for r in replicas):
        raise ModelLoadError(f"model {settings.model!r}: shard {shard.name!r} options.replicas "
                             "must be a list of 'dask' or 'dask:WORKER' placements")
    signature = _Signature(*plan_signature(settings.model, plan, spec))
    stage = DaskStage(spec, _stage_bytes(settings, shard.file), scheduler, worker, signature,
                      timeout_s=float(shard.options.get("timeout_s", 10.0)),
                      replicas=tuple(r.partition(":")[2] or None for r in replicas),
                      reload=lambda: _stage_bytes(settings, shard.file))
    stage.orders_own_calls = True  # the actor runs its calls in turn on its worker
    return stage


def plan_signature(model: str, plan, spec) -> tuple[list, list]:
    """A stage's inputs and outputs as onnxruntime would list them, from plan.toml's
    ``[decoder]`` (the scheduler need not have the stage's file or weights)."""
    from runtime.errors import ModelLoadError

    decoder = plan.raw.get("decoder", {})
    heads, dim = decoder.get("kv_heads"), decoder.get("head_dim")
    if not isinstance(heads, int) or not isinstance(dim, int):
        raise ModelLoadError(f"model {model!r}: plan.toml [decoder] needs kv_heads and head_dim "
                             "for a stage placed elsewhere (re-run shardserve partition)")
    kv_type = str(decoder.get("kv_type", "tensor(float)"))
    int32 = set(decoder.get("int32_inputs", []))
    inputs = []
    for name in spec.inputs:
        if name.startswith("past_key_values."):
            inputs.append(_Arg(name, kv_type, [-1, heads, -1, dim]))
        elif name in ("input_ids", "attention_mask", "position_ids"):
            inputs.append(_Arg(name, "tensor(int32)" if name in int32 else "tensor(int64)",
                               [-1, -1]))
    outputs = [_Arg(n, kv_type, [-1, heads, -1, dim]) for n in spec.present_names]
    if spec.carry_out == "logits":
        outputs.insert(0, _Arg("logits", kv_type, [-1, -1, -1]))
    return inputs, outputs
