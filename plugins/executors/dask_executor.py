"""The ``dask`` executor: shards pinned to Dask distributed workers.

``placement = "dask"`` spreads shards over the cluster's workers (shard i on worker
i mod n); ``"dask:NAME"`` pins a shard to the worker with that name or address. As the
plan's driver (the default when any shard is on Dask) it submits the whole request as a
graph of tasks, one per shard, each given the futures of the shards it reads: Dask moves
tensors worker to worker and the client fetches only the plan's outputs. Each shard file
is scattered to the cluster once at load; a worker builds its onnxruntime session on
first use and keeps it. Pinning is loose (``allow_other_workers``): if a shard's worker
dies, Dask reruns its task elsewhere, bounded by the request's deadline.

Options (``[executors.dask]``): ``scheduler`` (address, required), ``timeout_s``.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from typing import Any

from runtime.errors import GatewayTimeout, ModelLoadError, ServiceUnavailable

from .base import Executor, chain_for, decode_blob, encode_blob, record_hop, remaining_s, request_id

_clients: dict[str, list] = {}  # scheduler address -> [client, users]
_clients_lock = threading.Lock()
_sessions: dict[tuple, Any] = {}  # on workers: (load token, shard index) -> session
_chains: dict[str, Any] = {}  # on workers: load token -> transform chain


def _client(address: str) -> Any:
    from distributed import Client

    with _clients_lock:
        entry = _clients.get(address)
        if entry is None:
            entry = _clients[address] = [Client(address, set_as_default=False, timeout=10), 0]
        entry[1] += 1
        return entry[0]


def _release(address: str) -> None:
    with _clients_lock:
        entry = _clients.get(address)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _clients[address]
                entry[0].close()


def run_shard_task(spec: dict, model_bytes: bytes, direct: dict, *upstream: dict) -> dict:
    """On a worker: run one shard on the plan inputs it reads and its producers' outputs.

    Returns ``{"values": outputs, "hops": {index: hop}}``: this shard's hop plus every hop
    upstream of it, so the client learns the whole graph's hops from the outputs it fetches.
    """
    import onnxruntime as ort

    started = time.time()
    key = (spec["token"], spec["index"])
    session = _sessions.get(key)
    if session is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        session = _sessions[key] = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"])
    chain = _worker_chain(spec)
    values, hops, ready = dict(direct), {}, spec["submitted"]
    for produced in upstream:
        values.update(produced["values"])
        hops.update(produced["hops"])
        ready = max(ready, produced["hops"][produced["index"]]["finished"])
    feed = {}
    for name in spec["inputs"]:
        value = values[name]
        source = spec["sources"].get(name, spec["shard"])  # whose encode bound the tensor
        feed[name] = decode_blob(value, chain, _ctx(spec, name, source)) if chain else value
    result = dict(zip(spec["outputs"], session.run(spec["outputs"], feed)))
    if chain:
        result = {name: encode_blob(v, chain, _ctx(spec, name, spec["shard"]))
                  for name, v in result.items()}
    finished = time.time()
    hops[spec["index"]] = {
        "bytes_sent": sum(_size(values[n]) for n in spec["inputs"]),
        "bytes_received": sum(_size(v) for v in result.values()),
        # from the moment its last input was ready (client submit or upstream finish) to its
        # own finish: scheduling, worker-to-worker transfer and compute; clocks of one host
        "seconds": max(finished - ready, finished - started), "finished": finished}
    return {"values": result, "hops": hops, "index": spec["index"]}


def _size(value: Any) -> int:
    return len(value) if isinstance(value, bytes) else int(getattr(value, "nbytes", 0))


def _worker_chain(spec: dict) -> Any:
    if not spec["transforms"]:
        return None
    chain = _chains.get(spec["token"])
    if chain is None:
        from runtime import Runtime

        from .base import TransformChain

        chain = _chains[spec["token"]] = TransformChain(  # the plugins the server's config loads
            spec["transforms"], Runtime(spec["config"]).pm, spec["config"])
    return chain


def _ctx(spec: dict, tensor: str, shard: str) -> dict:
    return {"request_id": spec["request_id"], "shard": shard, "tensor": tensor}


class DaskExecutor(Executor):
    name = "dask"

    def __init__(self, backend: Any, options: dict):
        super().__init__(backend, options)
        self.address = options.get("scheduler")
        if not isinstance(self.address, str) or not self.address:
            raise ModelLoadError(f"model {self.model!r}: the dask executor needs "
                                 "[executors.dask] scheduler = \"tcp://host:port\"")
        self.chain = chain_for(backend, options)
        self.token = uuid.uuid4().hex
        self.client = _client(self.address)
        self.model_files: dict[int, Any] = {}  # index -> scattered shard bytes future
        self.workers: dict[int, str] = {}
        self._spread = itertools.count()

    def prepare(self, index: int) -> None:
        shard = self.shard(index)
        if shard.backend != "onnxruntime":
            raise ModelLoadError(f"model {self.model!r}: shard {shard.name!r}: the dask "
                                 "executor runs onnxruntime shards")
        target = shard.placement.partition(":")[2]
        workers = self.client.scheduler_info()["workers"]
        if target:
            by_name = {str(info.get("name")): addr for addr, info in workers.items()}
            if target not in workers and target not in by_name:
                raise ModelLoadError(f"model {self.model!r}: shard {shard.name!r} is pinned to "
                                     "a Dask worker the cluster does not have")
            self.workers[index] = by_name.get(target, target)
        else:
            addresses = sorted(workers)
            self.workers[index] = addresses[next(self._spread) % len(addresses)]
        data = self.backend.settings.read_bytes(shard.file)
        self.model_files[index] = self.client.scatter(data, broadcast=True, hash=False)

    def _spec(self, index: int, outputs: list[str], sources: dict) -> dict:
        shard = self.shard(index)
        threads = shard.options.get("intra_op_threads", self.options.get("intra_op_threads", 1))
        return {"token": self.token, "index": index, "inputs": shard.inputs,
                "outputs": outputs, "threads": int(threads), "request_id": request_id(),
                "shard": self._name(index), "sources": sources, "transforms": self.chain.names,
                "config": self.backend.settings.server if self.chain else None,
                "submitted": time.time()}

    def _name(self, index: int) -> str:
        return f"{self.model}.{self.shard(index).name}"

    def _submit(self, index: int, outputs: list[str], direct: dict, upstream: list,
                sources: dict | None = None) -> Any:
        if index not in self.model_files:
            self.prepare(index)  # a local shard the dask driver runs on the cluster
        return self.client.submit(
            run_shard_task, self._spec(index, outputs, sources or {}), self.model_files[index],
            direct,
            *upstream, workers=[self.workers[index]], allow_other_workers=True, pure=False,
            key=f"shard-{self.shard(index).name}-{uuid.uuid4().hex}")

    def _wait(self, futures: list, names: str) -> list:
        """Results in order, each waited for no longer than the request has left."""
        try:
            return [f.result(timeout=remaining_s(self.options, names)) for f in futures]
        except (GatewayTimeout, ServiceUnavailable):
            raise
        except TimeoutError:
            raise GatewayTimeout(f"model {self.model!r}: deadline passed in {names}") from None
        except Exception as exc:  # KilledWorker, CancelledError, a failing task
            raise ServiceUnavailable(f"model {self.model!r}: {names} failed on Dask "
                                     f"({type(exc).__name__})") from None
        finally:
            self.client.cancel([f for f in futures if not f.done()])

    def _plain(self, index: int, values: dict) -> dict:
        if not self.chain:
            return values
        ctx = {"request_id": request_id(), "shard": self._name(index)}
        return {n: decode_blob(v, self.chain, {**ctx, "tensor": n}) for n, v in values.items()}

    def run_shard(self, index: int, inputs: dict, outputs: list[str]) -> dict:
        shard = self.shard(index)
        direct = self._encode(index, inputs)
        (result,) = self._wait([self._submit(index, outputs, direct, [])],
                               f"shard {shard.name!r}")
        self._record(result["hops"])
        return self._plain(index, result["values"])

    def _record(self, hops: dict) -> None:
        """The graph's hops, in shard order, on the request's record."""
        for index in sorted(hops):
            hop = hops[index]
            record_hop(self.shard(index).name, self.name, hop["bytes_sent"],
                       hop["bytes_received"], hop["seconds"], in_graph=True)

    def _encode(self, index: int, inputs: dict) -> dict:
        if not self.chain:
            return inputs
        ctx = {"request_id": request_id(), "shard": self._name(index)}
        return {n: encode_blob(v, self.chain, {**ctx, "tensor": n}) for n, v in inputs.items()}

    def run_plan(self, inputs: dict, outputs: list[str]) -> dict:
        backend = self.backend
        if backend.plan.mode == "batch":
            return backend._run_batch(inputs, outputs)
        producer: dict[str, Any] = {}  # tensor -> future of the shard producing it
        made_by: dict[str, str] = {}  # tensor -> the producing shard's wire name
        futures = []
        final: dict[str, tuple[Any, int]] = {}
        for index, outs in backend._schedule(tuple(outputs)):
            shard = backend.plan.shards[index]
            need = [n for n in shard.inputs if n in inputs]
            upstream = list({id(producer[n]): producer[n]
                             for n in shard.inputs if n not in inputs}.values())
            sources = {n: made_by[n] for n in shard.inputs if n in made_by}
            future = self._submit(index, outs, self._encode(index, {n: inputs[n] for n in need}),
                                  upstream, sources)
            futures.append(future)
            for name in outs:
                producer[name], made_by[name] = future, self._name(index)
                final[name] = (future, index)
        wanted = list({id(final[n][0]): final[n] for n in outputs}.values())
        try:
            results = self._wait([f for f, _ in wanted], f"the plan's shards ({len(futures)})")
        finally:
            self.client.cancel([f for f in futures if not f.done()])
            del futures, producer
        values, hops = {}, {}
        for (_, index), result in zip(wanted, results):
            values.update(self._plain(index, result["values"]))
            hops.update(result["hops"])
        self._record(hops)
        return {name: values[name] for name in outputs}

    def close(self) -> None:
        if self.model_files:
            try:
                self.client.cancel(list(self.model_files.values()))
            except Exception:  # the cluster may already be gone
                pass
        self.model_files = {}
        _release(self.address)
