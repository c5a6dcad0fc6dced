"""The ``Runtime`` facade, the one object every handler calls: it owns the config, the plugin
manager, the model repository and the loaded models, and knows nothing of HTTP (failures are
:mod:`runtime.errors`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol

from .config import Config, load_config
from .dtypes import label
from .errors import (
    BadRequest,
    Forbidden,
    GatewayTimeout,
    ModelLoadError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ShardserveError,
)
from .messages import InferRequest, InferResponse
from .plugins import PluginManager, Registry, call_chain
from .records import FrozenRecord, LazyLogger, Record
from .repository import ModelConfig, ModelRepository, validate_model_name, validate_version

log = LazyLogger("shardserve.runtime")

UNLOADED = "unloaded"


class TensorSpec(Record):
    """A model input or output: V2 datatype and shape, ``-1`` for dynamic dims."""

    __slots__ = ("name", "datatype", "shape")

    def __init__(self, name: str, datatype: str, shape: list[int]):
        self.name, self.datatype, self.shape = name, datatype, shape

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class BackendSettings(Record):
    """Everything a backend gets to load one model version: ``read_bytes`` reads a file of the
    version, model-bytes transforms applied; ``backends`` serves backends that compose others
    (plan shards), ``plugins`` is the runtime's (kernels, executors, transforms)."""

    _fields = ("model", "version", "path", "config", "options", "read_bytes", "server",
               "backends", "plugins")

    def __init__(self, model: str, version: int, path: Path, config: ModelConfig, options: dict,
                 read_bytes: Callable[[str], bytes], server: Config,
                 backends: Registry | None = None, plugins: PluginManager | None = None):
        self.model, self.version, self.path, self.config = model, version, path, config
        self.options, self.read_bytes, self.server = options, read_bytes, server
        self.backends, self.plugins = backends, plugins


class Backend(Protocol):
    """What ``backend_class(settings)`` returns (``shardserve_register_backends``): ``load()``
    reads the model, then ``inputs``/``outputs`` describe it; ``run`` gets checked inputs and
    the output names wanted. ``close()`` is optional."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def load(self) -> None: ...

    def run(self, inputs: dict[str, Any], outputs: list[str]) -> dict[str, Any]: ...


class RequestLimits(FrozenRecord):
    """Per-request limits a plugin sets for a principal (``shardserve_request_limits``):
    ``max_batch_size`` 0 is no limit (a larger first dimension gets 413); past ``deadline``
    (``time.monotonic()``) the request gets 504."""

    __slots__ = ("max_batch_size", "deadline")

    def __init__(self, max_batch_size: int = 0, deadline: float | None = None):
        object.__setattr__(self, "max_batch_size", max_batch_size)
        object.__setattr__(self, "deadline", deadline)

    def check_request(self, request: InferRequest) -> None:
        for item in request.inputs if self.max_batch_size else ():
            if item.shape and item.shape[0] > self.max_batch_size:
                raise PayloadTooLarge(f"batch size {item.shape[0]} is over the server "
                                      f"limit {self.max_batch_size}")

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise GatewayTimeout("request deadline passed")


def check_tensor(specs: Mapping, name: str, datatype: str, shape: tuple, batched: bool) -> tuple:
    """Check a client tensor against the model's input ``specs``; the shape the model gets.

    A model tensor whose dims (after the batch dim) are ``[]`` is reported as ``dims: [1]`` with
    ``reshape: {shape: []}``, as Triton does, so shape ``[1]`` (``[batch, 1]``) is accepted too.
    """
    spec = specs.get(name)
    if spec is None:
        raise BadRequest(f"unexpected input {label(name)}")
    if datatype != spec.datatype:
        raise BadRequest(f"input {label(name)}: datatype {datatype}, model expects {spec.datatype}")
    want = spec.shape
    if len(want) == batched and len(shape) == len(want) + 1 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == len(want):
        for w, g in zip(want, shape):  # a loop, not any(): this runs on every request
            if w != g and w != -1:
                break
        else:
            return shape
    raise BadRequest(f"input {label(name)}: shape {list(shape)}, model expects {want}")


class LoadedModel:
    """A served model version (a wrapped, loaded backend) and the requests running on it.

    ``with model:`` (after :meth:`Runtime.acquire`) counts a request in; a retired version
    closes when its last request ends. The count is a list, whose append and pop are atomic:
    no lock on the request path."""

    def __init__(self, name: str, version: int, backend: Any, config: ModelConfig):
        self.name, self.version, self.backend, self.config = name, version, backend, config
        self.inputs, self.outputs = list(backend.inputs), list(backend.outputs)
        self.input_specs = {spec.name: spec for spec in self.inputs}
        self.output_names = [spec.name for spec in self.outputs]
        self.max_batch_size = config.max_batch_size
        self.batched = bool(self.max_batch_size)
        self.version_label = str(version)  # as responses and audit events name it
        self._running: list = []  # one entry per request running on it
        self._retired = False
        self._closed = threading.Lock()  # taken once: by whoever closes the backend

    def hold(self) -> bool:
        """Count a request in; False once a reload or unload retired this version."""
        self._running.append(None)
        if not self._retired:
            return True
        self.release()
        return False

    def release(self) -> None:
        self._running.pop()
        if self._retired and not self._running:
            self._close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def retire(self) -> None:
        """Close the backend now, or when the requests still running on it finish."""
        self._retired = True
        if not self._running:
            self._close()

    def _close(self) -> None:
        if self._closed.acquire(blocking=False):
            close_backend(self.backend)

    def check(self, request: InferRequest) -> tuple[dict, list[str]]:
        """The feed dict and the output names wanted, after checking names, datatypes and
        shapes (each input's already when ``decode_request`` checked it against this version)."""
        specs = self.input_specs
        if request.checked is specs:
            feed = {item.name: item.data for item in request.inputs}
        else:
            feed = {}
            for item in request.inputs:
                shape = check_tensor(specs, item.name, item.datatype, item.shape, self.batched)
                feed[item.name] = item.data if shape is item.shape else item.data.reshape(shape)
        if len(feed) != len(specs):
            missing = sorted(set(specs) - set(feed))
            raise BadRequest(f"missing inputs for model {self.name!r}: {', '.join(missing)}")
        limit = self.max_batch_size
        if limit and feed:
            shape = request.inputs[0].shape
            if shape and shape[0] > limit:
                raise BadRequest(f"batch size {shape[0]} is over max_batch_size {limit}")
        if request.outputs is None:
            return feed, self.output_names
        wanted = [o.name for o in request.outputs]
        unknown = [n for n in wanted if n not in self.output_names]
        if unknown:
            raise BadRequest(f"unknown output {unknown[0]!r} for model {self.name!r}")
        if len(set(wanted)) != len(wanted):
            raise BadRequest("an output is requested twice")
        return feed, wanted


def new_request_id() -> str:
    """A fresh request id, 16 hex digits: dispatch's for a request that brings no sane one,
    and the id of a call made without an edge and without a V2 ``id``."""
    return os.urandom(8).hex()


class CallContext:
    """The request a backend run serves, for executors (docs/executors.md): the id binds
    encrypted tensors to it, the deadline bounds every remote call, hops are recorded.
    ``handlers.routes.dispatch`` opens one per request with its request id (``with
    CallContext(id) as call``); ``Runtime.run`` fills in the model, the deadline and the
    version that served, which reach the audit event."""

    __slots__ = ("_request_id", "model", "deadline", "hops", "version", "_token")

    def __init__(self, request_id: str | None = None, model: str | None = None,
                 deadline: float | None = None, version: str | None = None):
        self._request_id = request_id
        self.model = model
        self.deadline = deadline  # time.monotonic(); the earlier of caller's and limits'
        self.hops: list[dict] = []  # executors append one dict per remote hop
        self.version = version

    @property
    def request_id(self) -> str:
        """The request's id, made up on first use when nobody gave one."""
        if self._request_id is None:
            self._request_id = new_request_id()
        return self._request_id

    def __enter__(self) -> CallContext:  # a plain class: cheaper than @contextmanager
        self._token = _call.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _call.reset(self._token)


_call: ContextVar[CallContext | None] = ContextVar("shardserve_call", default=None)


def current_call() -> CallContext | None:
    """The request being served in this context (set by ``Runtime.run``), or None."""
    return _call.get()


class ModelStatus(Record):
    """``state``: READY, UNAVAILABLE or LOADING; ``failed``: the files' stamp when a load
    failed (lazy mode waits for news)."""

    _fields = ("state", "reason", "versions", "failed")

    def __init__(self, state: str = "UNAVAILABLE", reason: str = "",
                 versions: dict[int, LoadedModel] | None = None, failed: tuple | None = None):
        self.state, self.reason, self.failed = state, reason, failed
        self.versions = {} if versions is None else versions


def _stamp(path: Path, depth: int = 2) -> tuple:
    """Names and mtimes of a model's files (model.toml, versions and their files): a cheap
    sign that they changed since a load failed."""
    try:
        return tuple((p.name, p.stat().st_mtime_ns, _stamp(p, depth - 1) if depth and p.is_dir()
                      else ()) for p in sorted(path.iterdir()))
    except OSError:
        return ()


class Runtime:
    """Serve the models of one repository through the registered plugins."""

    def __init__(self, config: Config, plugin_manager: PluginManager | None = None):
        self.config = config
        self._pm = plugin_manager
        self.repository = ModelRepository(config.repository)
        self._models: dict[str, ModelStatus] = {}
        self._lock = threading.RLock()  # guards _model_locks only: loads lock one model
        self._model_locks: dict[str, threading.RLock] = {}
        self._shared: Any = None  # shardserve_shared_repository: one state for all workers
        self._started = False

    @classmethod
    def from_config(cls, source: str | Path | Mapping | Config | None = None, *,
                    overrides: Mapping | None = None, plugins: tuple = ()) -> Runtime:
        """Build a runtime from a TOML path, a dict or a :class:`Config`."""
        config = load_config(source, overrides)
        return cls(config, PluginManager.for_config(config, plugins))

    # plugins ----------------------------------------------------------------

    @property
    def pm(self) -> PluginManager:
        if self._pm is None:
            self._pm = PluginManager.for_config(self.config)
        return self._pm.load_plugins()

    # security ---------------------------------------------------------------

    def authenticate(self, request: Any) -> Any:
        """The principal behind a request (``None``: no credentials given)."""
        if not self._started:  # security plugins arm at startup: never serve unarmed
            self.start()
        hook = self.pm.hook.shardserve_authenticate
        # no implementation (security off): pluggy would answer None, for 1.5 µs a request
        return hook(request=request) if hook.get_hookimpls() else None

    def authorize(self, principal: Any, action: str, model: str | None) -> None:
        """Raise unless every plugin allows ``action``; any denial wins."""
        hook = self.pm.hook.shardserve_authorize
        if not hook.get_hookimpls():  # nobody to deny it (pluggy would answer [])
            return
        if any(answer is False for answer in hook(principal=principal, action=action, model=model)):
            target = f" model {model[:128]!r}" if model else ""
            raise Forbidden(f"not allowed to {action}{target}")

    def audit(self, event: dict) -> None:
        """Hand a finished request's summary to the audit plugins."""
        self.pm.hook.shardserve_audit(event=event)

    @property
    def backends(self) -> Registry:
        return self.pm.registry("backend", callable)

    def start(self) -> Runtime:
        """Call the startup hook and load models as ``repository.load`` says."""
        if self._started:
            return self
        self._started = True
        self.pm.hook.shardserve_startup(runtime=self)
        load = self.config.load
        names = self.repository.names() if load == "all" else load if isinstance(load, list) else []
        wanted = dict.fromkeys(names, "load")
        self._shared = self.pm.hook.shardserve_shared_repository(runtime=self)
        if self._shared is not None:  # what other workers were asked before this one started
            self._shared.sync(wanted.__setitem__)
        for name, action in wanted.items():
            self._apply(name, action)
        return self

    def _apply(self, name: str, action: str) -> None:
        """Load or unload here what was asked at startup or through another worker."""
        try:
            self._load(name) if action == "load" else self._unload(name)
        except ShardserveError as exc:
            log.error("model %s failed to %s: %s", name, action, exc.message)

    def _sync(self, name: str | None = None, background: bool = False) -> None:
        """Apply other workers' changes; ``background``: wait only for ``name``'s."""
        if self._shared is not None:
            self._shared.sync(self._apply, name, background)

    def _model_lock(self, name: str) -> threading.RLock:
        with self._lock:
            return self._model_locks.setdefault(name, threading.RLock())

    # repository -------------------------------------------------------------

    def models(self) -> list[dict]:
        """The repository index: every model with its state (Triton's format)."""
        self._sync()
        out = []
        for name in self.repository.names():
            status = self._models.get(name) or ModelStatus()
            state = {"state": status.state, "reason": status.reason}
            out += [{"name": name, "version": str(v), **state} for v in sorted(status.versions)
                    ] or [{"name": name, **state}]
        return out

    def load(self, name: str) -> None:
        """(Re)load every version the model's policy selects, in every worker."""
        self._publish(name, "load")

    def unload(self, name: str) -> None:
        """Unload in every worker: new requests get 503, running ones finish first."""
        self._publish(name, "unload")

    def _publish(self, name: str, action: str) -> None:
        validate_model_name(name)
        if not self.repository.exists(name) and (action == "load" or name not in self._models):
            raise NotFound(f"unknown model {name!r}")
        with self._model_lock(name):  # other models keep serving and loading meanwhile
            if self._shared is not None:
                self._shared.publish(name, action)
            self._load(name) if action == "load" else self._unload(name)

    def _load(self, name: str) -> None:
        """The old versions serve until the new ones are ready, then close once idle."""
        with self._model_lock(name):
            status = self._models.setdefault(name, ModelStatus())
            old = dict(status.versions)
            status.state, status.reason = "LOADING", ""
            status.failed, stamp = None, _stamp(self.repository.root / name)
            opened: list = []  # closed again if a later version fails
            try:
                loaded = {}
                try:
                    cfg = self.repository.config(name)
                    for v in self.repository.select_versions(cfg):
                        opened.append(self.open_version(cfg, v, wrap=True))
                        loaded[v] = LoadedModel(name, v, opened[-1], cfg)
                except BaseException:
                    for backend in opened:
                        close_backend(backend)
                    status.failed = stamp
                    raise
            except ShardserveError as exc:
                status.state, status.reason = "UNAVAILABLE", exc.message
                if old:  # keep serving what was there
                    status.state, status.reason = "READY", f"reload failed: {exc.message}"
                raise
            except Exception as exc:  # a backend bug must not leave LOADING behind
                status.state, status.reason = "UNAVAILABLE", "load failed"
                log.error("model %s failed to load: %s", name, type(exc).__name__)
                raise ModelLoadError(f"model {name!r} failed to load") from exc
            status.versions, status.state = loaded, "READY"
        for model in old.values():
            model.retire()
        log.info("model %s loaded (versions %s)", name, sorted(loaded))

    def read_model_file(self, name: str, version: int, filename: str,
                        directory: Path | None = None) -> bytes:
        """A model file's bytes after every ``shardserve_transform_model_bytes``
        (signature check, decryption). ``directory``: a version being built (tools)."""
        data = (self.repository.read_file(name, version, filename) if directory is None
                else (directory / filename).read_bytes())
        return call_chain(self.pm, "shardserve_transform_model_bytes", "data", data,
                          model=name, version=str(version), filename=filename, config=self.config)

    def open_version(self, cfg: ModelConfig, version: int, directory: Path | None = None,
                     wrap: bool = False) -> Backend:
        """The one way to open a model version (plan or not): the backend that
        ``shardserve_select_backend`` or model.toml names, loaded; ``wrap``: as served."""
        path = directory or self.repository.version_dir(cfg.name, version)
        name = self.pm.hook.shardserve_select_backend(config=cfg, path=path) or cfg.backend
        if name not in self.backends:
            off = "" if self.pm.allow is None else "; plugins off the allow-list are not loaded"
            raise ModelLoadError(f"model {cfg.name!r}: unknown backend {name!r} (available: "
                                 f"{', '.join(self.backends.names())}){off}")
        settings = BackendSettings(
            model=cfg.name, version=version, path=path, config=cfg,
            options=cfg.backend_options(), server=self.config, backends=self.backends,
            read_bytes=lambda filename: self.read_model_file(cfg.name, version, filename,
                                                             directory),
            plugins=self.pm)
        backend = self.backends[name](settings)
        backend.load()
        try:
            return call_chain(self.pm, "shardserve_wrap_backend", "backend", backend,
                              settings=settings) if wrap else backend  # batching, metrics...
        except BaseException:
            close_backend(backend)
            raise

    def _unload(self, name: str) -> None:
        with self._model_lock(name):
            if name not in self._models and not self.repository.exists(name):
                raise NotFound(f"unknown model {name!r}")
            status = self._models.setdefault(name, ModelStatus())
            versions, status.versions = status.versions, {}
            status.state, status.reason = "UNAVAILABLE", UNLOADED
        for model in versions.values():
            model.retire()
        if versions:
            log.info("model %s unloaded", name)

    # serving ----------------------------------------------------------------

    def get_model(self, name: str, version: str | int | None = None) -> LoadedModel:
        """The loaded model version (the newest when ``version`` is None)."""
        if self._shared is not None:
            self._shared.sync(self._apply, name, True)
        status = self._models.get(name)
        versions = (status if status is not None and status.versions else self._status(name)
                    ).versions
        wanted = validate_version(version) if version is not None else None
        if wanted is None:
            try:
                return versions[max(versions)]
            except ValueError:  # unloaded meanwhile
                raise ServiceUnavailable(f"model {name!r} is not loaded") from None
        model = versions.get(wanted)
        if model is None:
            raise NotFound(f"version {wanted} of model {name!r} is not available")
        return model

    def _status(self, name: str) -> ModelStatus:
        """The model's status with versions loaded: loaded now in "lazy" mode, else 503."""
        status = self._models.get(name)
        if status is not None and status.versions:
            return status
        validate_model_name(name)
        if not self.repository.exists(name):
            raise NotFound(f"unknown model {name!r}")
        reason = status.reason if status else "not loaded"
        if self.config.load != "lazy" or reason == UNLOADED:  # an unload holds in lazy mode too
            raise ServiceUnavailable(f"model {name!r} is not ready: {reason or 'not loaded'}")
        with self._model_lock(name):
            status = self._models.get(name)
            if status is None or not status.versions:
                if status is not None and status.failed == _stamp(self.repository.root / name):
                    raise ServiceUnavailable(f"model {name!r} is not ready: {status.reason}")
                self._load(name)
            return self._models[name]

    def ready(self, name: str | None = None, version: str | int | None = None) -> bool:
        """One model's readiness, or the server's: started, and every model it tried to load
        READY (a model unloaded on request does not count against it)."""
        self._sync(name, background=True)
        if name is None:
            return self._started and all(
                s.state == "READY" or s.reason == UNLOADED for s in list(self._models.values())
            )
        validate_model_name(name)
        wanted = validate_version(version)
        try:
            status = self._status(name)  # loads in "lazy" mode, else 503
        except NotFound:
            raise
        except ShardserveError:
            return False
        if wanted is None or wanted in status.versions:
            return True
        if wanted not in self.repository.versions(name):
            raise NotFound(f"unknown version {wanted} of model {name!r}")
        return False

    def metadata(self, name: str, version: str | int | None = None) -> dict:
        model = self.get_model(name, version)
        status = self._models[name]
        return {
            "name": name,
            "versions": [str(v) for v in sorted(status.versions)],
            "platform": getattr(model.backend, "platform", model.config.backend),
            "inputs": [spec.to_dict() for spec in model.inputs],
            "outputs": [spec.to_dict() for spec in model.outputs],
            **({"parameters": {"task": model.backend.task}}
               if isinstance(getattr(model.backend, "task", None), str) else {}),
        }

    def acquire(self, name: str, version: str | int | None = None) -> LoadedModel:
        """The served version, counted in until released (``with rt.acquire(name) as model``):
        a reload or unload closes it only after that."""
        for _ in range(100):  # a miss means a reload swapped the version meanwhile
            model = self.get_model(name, version)
            if model.hold():
                return model
        raise ServiceUnavailable(f"model {name!r} is reloading")

    def infer(self, name: str, request: InferRequest, version: str | int | None = None,
              principal: Any = None, deadline: float | None = None) -> InferResponse:
        """Run one inference request; raises typed errors for bad requests. ``deadline`` is a
        ``time.monotonic()`` value (a Lambda's remaining time): past it the model does not run
        and the caller gets 504."""
        model = self.get_model(name, version)
        if not model.hold():  # retired meanwhile by a reload or unload
            model = self.acquire(name, version)
        try:
            return self.run(model, request, principal, deadline)
        finally:
            model.release()

    def run(self, model: LoadedModel, request: InferRequest, principal: Any = None,
            deadline: float | None = None) -> InferResponse:
        """:meth:`infer` on a version already held with :meth:`acquire` (the infer route:
        one lookup for decoding and running)."""
        feed, wanted = model.check(request)
        limits = None
        if principal is not None or deadline is not None:
            limits, deadline = self.request_limits(principal, model.name, deadline)
            if limits is not None:
                limits.check_request(request)
        version, call = model.version_label, _call.get()
        if call is not None and call.model is None:  # dispatch's context: its request id
            call.model, call.deadline, call.version = model.name, deadline, version
            outputs = model.backend.run(feed, wanted)
        else:  # called without an edge: the V2 id, if any, names the call
            token = _call.set(CallContext(request.id, model.name, deadline, version))
            try:
                outputs = model.backend.run(feed, wanted)
            finally:
                _call.reset(token)
        if limits is not None:
            limits.check_deadline()
        return InferResponse(model.name, version, outputs, request.id)

    def request_limits(self, principal: Any, model: str,
                       deadline: float | None = None) -> tuple[RequestLimits | None, float | None]:
        """The strictest limits plugins set for ``principal`` (None without one) and the earlier
        of their deadline and the caller's ``deadline``: 504 once that has passed."""
        found = principal is not None and self.pm.hook.shardserve_request_limits(
            principal=principal, model=model)
        limits = RequestLimits(
            min((lim.max_batch_size for lim in found if lim.max_batch_size), default=0),
            min((lim.deadline for lim in found if lim.deadline is not None), default=None),
        ) if found else None
        if limits is not None and limits.deadline is not None:
            deadline = limits.deadline if deadline is None else min(deadline, limits.deadline)
        if deadline is not None and time.monotonic() > deadline:
            raise GatewayTimeout(f"deadline passed before model {model!r} ran")
        return limits, deadline

    def generate(self, name: str, request: Any, version: str | int | None = None,
                 principal: Any = None, deadline: float | None = None) -> Any:
        """Start a generation on a backend that may stream (``generate``) and return its event
        iterator. ``request`` is that backend's own request object: the core only finds the
        model, applies the principal's deadline, and answers 400 when the model cannot stream."""
        model = self.acquire(name, version)  # held until the stream ends: reloads drain it
        try:
            stream = getattr(model.backend, "generate", None)
            if stream is None:
                raise BadRequest(f"model {name!r} does not generate text")
            _, deadline = self.request_limits(principal, name, deadline)
            return _HeldStream(stream(request, deadline=deadline), model)
        except BaseException:
            model.release()
            raise

    def close(self) -> None:
        """Close this process's models (other workers keep theirs)."""
        for name in list(self._models):
            self._unload(name)


class _HeldStream:
    """A generation's events; its model version stays open until they end or are closed."""

    _model: LoadedModel | None = None

    def __init__(self, events: Any, model: LoadedModel):
        self._events, self._model = iter(events), model

    def __iter__(self) -> _HeldStream:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._events)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            getattr(self._events, "close", lambda: None)()
            model.release()

    __del__ = close


def close_backend(backend: Any) -> None:
    """Close a backend if it can be closed; a failure is logged, never raised."""
    close = getattr(backend, "close", None)
    if close is not None:
        try:
            close()
        except Exception as exc:  # closing must never fail an unload
            log.warning("backend close failed: %s", type(exc).__name__)
