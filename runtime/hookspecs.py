"""Every hook a shardserve plugin can implement: functions named after these specs, decorated
with ``@hookimpl``, in a module registered from ``DEFAULT_PLUGINS`` or a ``shardserve`` entry
point. Each docstring is the plugin author's whole contract (docs/plugins.md repeats the
signatures). Every ``register_*`` hook raises at startup when a name is registered twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # the hooks name runtime types; importing them here would be circular
    from .config import Config
    from .core import Backend, BackendSettings, RequestLimits, Runtime
    from .repository import ModelConfig

PROJECT_NAME = "shardserve"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def shardserve_register_backends(register: Callable[[str, type], None]) -> None:
    """Register model backends by calling ``register(name, backend_class)``.

    ``backend_class(settings)`` gets one :class:`runtime.BackendSettings` and is a
    :class:`runtime.core.Backend`: ``load()`` (afterwards ``inputs``/``outputs`` list
    :class:`runtime.TensorSpec`), ``run(inputs, outputs) -> dict`` of numpy arrays and an optional
    ``close()``. A backend may stream: ``generate(request, deadline=None) -> Iterator``
    (``Runtime.generate`` hands it the API's request object; raise typed errors before the first
    item, as the status is sent then). A model selects its backend with ``backend = "name"`` in
    model.toml, or a plugin claims a version through ``shardserve_select_backend``.
    """


@hookspec(firstresult=True)
def shardserve_select_backend(config: ModelConfig, path: Path) -> str | None:
    """Name the backend for one model version, overriding model.toml's ``backend``.

    ``path`` is the version directory. The ``plan`` backend claims any version holding
    ``plan.toml``. Return a registered backend name, or ``None`` to let model.toml decide. Stops at
    first non-None result.
    """


@hookspec
def shardserve_register_kernels(register: Callable[[str, Any], None]) -> None:
    """Register numba kernels by calling ``register(name, kernel)``.

    ``kernel`` is a ``plugins.kernels.Kernel``: its contract (input and output names, accepted
    datatypes, shape rule, parameters with defaults) plus the ``"module:function"`` path of its
    numba-jitted function, imported and compiled only when a model that uses it loads, never when
    the plugin is imported. The ``numba`` backend looks ONNX operators up by ``op_type``
    (``"MatMul"``); model.toml pipeline stages (``postprocess = ["topk:5"]``) by lower-case names.
    """


@hookspec
def shardserve_register_commands(subparsers: Any) -> None:
    """Add CLI subcommands to ``shardserve``.

    ``subparsers`` is the ``argparse`` sub-parser collection of the ``shardserve`` command. Add a
    parser and give it a ``func`` default: ``p = subparsers.add_parser("hello");
    p.set_defaults(func=run)``; ``run(args) -> int | None`` is called with the parsed arguments and
    its return value becomes the exit status. Import heavy modules inside ``run``, not at module
    level, so other commands stay fast.
    """


@hookspec
def shardserve_register_optimizers(register: Callable[[str, Any], None]) -> None:
    """Register model optimizers by calling ``register(name, optimizer)``.

    ``optimizer`` follows :class:`plugins.optimizers.base.Optimizer`: a ``name``, declared
    ``options`` (validated, with ranges), a declared accuracy ``tolerance(options)`` and
    ``apply(model, options, calibration)`` returning a new ``onnx.ModelProto`` (never modifying the
    one it gets). ``shardserve optimize`` runs chains of them and publishes the result as a new
    model version.
    """


@hookspec
def shardserve_transform_model_bytes(
    model: str, version: str, filename: str, data: bytes, config: Config
) -> bytes | None:
    """Transform a model file's bytes after they are read and before any backend sees them: verify
    a signature, decrypt, reject.

    Called for every model file the repository hands to a backend. Return the new bytes, or
    ``None`` to leave them as they are. Implementations run in plugin order (``tryfirst`` ones
    first), each seeing the previous one's output. Raise a :class:`runtime.errors.ShardserveError`
    (usually ``ModelLoadError``) to refuse the model; its message names the file but never a path
    outside the repository. ``config`` is the server config. ``shardserve partition`` verifies a
    new plan through the same chain.
    """


@hookspec
def shardserve_register_partitioners(register: Callable[[str, Any], None]) -> None:
    """Register partitioning strategies by calling ``register(name, partitioner)``.

    A partitioner has a ``description`` string and ``partition(graph, costs, options) ->
    Partition``: given the model's unit graph (``plugins.partitioners.graph.ModelGraph``), the
    per-unit costs and a dict of options, it returns which units go in which shard, where each
    shard is placed and the predicted costs (docs/partitioning.md). It raises ``BadRequest`` for
    options no plan can satisfy.
    """


@hookspec
def shardserve_register_executors(register: Callable[[str, Any], None]) -> None:
    """Register shard executors by calling ``register(name, factory)``.

    ``factory(backend, options)`` gets the loading ``plan`` backend and the executor's options
    (``[executors.<name>]`` of the server config updated by model.toml's) and returns an object
    with ``prepare(index)`` (called at load for each shard whose placement names this executor:
    connect, check), ``run_shard(index, inputs, outputs) -> dict`` and ``close()``; a driver
    (``executor = "name"`` in plan.toml or model.toml) also has ``run_plan(inputs, outputs) ->
    dict``. A placement names its executor by scheme: ``local``, ``http://...``, ``lambda:fn``,
    ``dask:worker``. Take timeouts from ``runtime.current_call()``; raise ``ServiceUnavailable``
    naming the shard when it cannot be reached.
    """


@hookspec
def shardserve_register_registries(register: Callable[[str, Any], None]) -> None:
    """Register node registry stores by calling ``register(name, factory)``.

    ``factory(config, settings)`` returns a store with ``heartbeat(node, record, owner, ttl_s)``
    (register or refresh under a lease), ``deregister(node, owner)``, ``nodes() -> list[dict]``
    and ``close()``; a live node written by another owner raises ``Forbidden``, an unreachable
    store ``ServiceUnavailable``. ``[registry] store`` picks one (docs/registry.md).
    """


@hookspec
def shardserve_startup(runtime: Runtime) -> None:
    """Called once when a :class:`runtime.Runtime` is built, after its plugins are loaded and
    before any model loads. Use it to validate this plugin's section of the config (raise
    ``ConfigError``) or to warm caches.
    """


@hookspec
def shardserve_wrap_backend(settings: BackendSettings, backend: Backend) -> Backend | None:
    """Wrap a model version's backend right after its ``load()``: pipeline stages, batching,
    metrics, caching.

    ``backend`` is the loaded backend (or an earlier plugin's wrapper). Return an object with the
    same interface (a loaded :class:`runtime.core.Backend`) or ``None`` to leave it.
    Implementations chain in plugin order (``tryfirst`` ones innermost), each wrapping the previous
    result. The core has validated every request before ``run`` is called.
    """


@hookspec(firstresult=True)
def shardserve_authenticate(request: Any) -> Any | None:
    """Say who sent a request: return a principal, or ``None`` if the request carries none of this
    plugin's credentials.

    ``request`` has ``method``, ``path``, ``headers`` (lower-case names), ``query`` and ``body``
    (bytes); it is not tied to Flask or Lambda. Raise :class:`runtime.errors.Unauthorized` when
    this plugin's credentials are present but wrong, expired or replayed. The principal is handed
    to ``shardserve_authorize`` and to ``Runtime.infer``. Stops at first non-None result.
    """


@hookspec
def shardserve_authorize(principal: Any, action: str, model: str | None) -> bool | None:
    """Decide whether ``principal`` (``None`` when nobody authenticated) may perform ``action`` on
    ``model``.

    ``action`` is the route's name ("health", "server_metadata", "metadata", "infer", "generate",
    "repository_index", "load", "unload", "metrics"); ``model`` is ``None`` for routes without one.
    Return ``False`` (or raise ``Forbidden``, ``Unauthorized`` or ``TooManyRequests``) to deny,
    ``True`` or ``None`` to allow. Every implementation is called and any denial wins.
    """


@hookspec
def shardserve_request_limits(principal: Any, model: str) -> RequestLimits | None:
    """Limits for one inference by an authenticated ``principal`` on ``model``: a
    :class:`runtime.core.RequestLimits` (largest batch, deadline), or ``None``.

    Called by ``Runtime.infer`` and ``Runtime.generate`` only when a principal is set; every limit
    returned applies (the strictest wins): over the batch limit is 413, past the deadline 504.
    """


@hookspec
def shardserve_audit(event: dict) -> None:
    """Record one finished request: ``event`` holds ``principal``, ``action``, ``model``,
    ``version`` (as the client asked), ``served_version`` (the version that ran, ``None`` when no
    model ran), ``hops`` (one dict per remote shard call: ``shard``, ``executor``, ``bytes_sent``,
    ``bytes_received``, ``seconds``; for a split language model, one per stage and phase:
    ``stage``, ``phase``, ``calls``, ``positions``, ``bytes``, ``wire_sent``,
    ``wire_received``, ``batch_rows``), ``outcome`` (HTTP status), ``latency_ms``, ``bytes_in``,
    ``bytes_out`` and ``request_id``. It never holds payloads, keys or tokens, and an
    implementation must not add them. Must not raise.
    """


@hookspec
def shardserve_register_tensor_transforms(register: Callable[[str, Any], None]) -> None:
    """Register transforms for tensors crossing the network between shards by calling
    ``register(name, factory)``.

    ``factory(config)`` returns an object with ``encode(data: bytes, context: dict) -> bytes`` and
    ``decode(data: bytes, context: dict) -> bytes``; ``context`` holds at least ``request_id`` and
    ``shard``, which an encrypting transform binds as associated data so a tensor cannot be
    replayed into another request or shard. ``decode`` raises a ``ShardserveError`` on tampered
    data. Executors apply the chain on every hop.
    """


@hookspec(firstresult=True)
def shardserve_shared_repository(runtime: Runtime) -> Any | None:
    """Return the store through which a server's worker processes share one repository state, or
    ``None`` (one process: nothing to share). Stops at first non-None result.

    The store has ``publish(model: str, action: str)``, called with ``"load"`` or ``"unload"``
    (holding that model's lock) before a repository API request is applied in this process, and
    ``sync(apply)``, called before every request is answered and once at startup: it calls
    ``apply(model, action)`` for each request published since by any process and returns only once
    they are applied. Its no-change path must be cheap.
    """
