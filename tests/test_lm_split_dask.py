"""A decoder stage in a Dask actor with a replica (issue #23): the worker process holding the
actor is killed mid-stream; the stage moves to a fresh actor on another worker, its caches are
rebuilt from the tokens so far, and every stream's greedy tokens equal the unsplit model's; with
no replica left, a dead worker ends the next stream with a 503 naming the stage."""

from __future__ import annotations

import os
import signal
import time

import pytest
from generation_models import cached_export, repository_with
from test_lm_split import _greedy
from test_lm_split_lambda import PROMPTS, concurrent_greedy

from runtime import Runtime
from runtime.errors import ServiceUnavailable

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("replica", ["named", "any"])
def test_a_killed_dask_worker_fails_over_to_an_actor_on_another(tmp_path, replica):
    """The replica names the other worker (``dask:ADDRESS``), or lets the scheduler pick a
    live one (``dask``)."""
    from distributed import Client, LocalCluster

    from handlers.cli import main

    arch = "llama"
    root = repository_with(tmp_path / "edge", {arch: cached_export(arch)[0]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "--strategy", "pipeline",
                 "--shards", "3"]) == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, host="127.0.0.1") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)  # worker address -> its process
        first, second = sorted(pids)
        plan = root / arch / "2" / "plan.toml"
        head, sep, tail = plan.read_text().partition('name = "stage_1"')
        plan.write_text(head + sep + tail.replace(
            'placement = "local"', f'placement = "dask:{first}"\n'
            f'options = {{replicas = ["{"dask:" + second if replica == "named" else "dask"}"], '
            'timeout_s = 5}', 1))
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"},
                                  "executors": {"dask": {"scheduler":
                                                         cluster.scheduler_address}}}).start()
        try:
            whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
            engine = split.engine
            stage = engine.stages[1]
            assert type(stage).__name__ == "DaskStage"
            # the file is read again on a fail-over, not held by every group's stage
            assert all(not isinstance(cell.cell_contents, bytes)
                       for g in getattr(engine, "groups", [engine])
                       for cell in g.stages[1]._reload.__closure__ or ())
            jobs = [(PROMPTS[i], n) for i, n in enumerate((16, 12, 20))]
            alone = [_greedy(whole, p, n) for p, n in jobs]
            decode, calls = stage.decode, []

            def killing(rows, carry):
                calls.append(len(rows))
                if len(calls) == 5:  # the worker holding the actor dies between two steps
                    os.kill(pids[first], signal.SIGKILL)
                return decode(rows, carry)

            stage.decode = killing
            started = time.monotonic()
            assert concurrent_greedy(split, jobs) == alone
            assert engine.rebuilds >= 1 and stage.replica == 1
            assert time.monotonic() - started < 30  # a dead worker is noticed at once
            # no replica left: the workers die too, the next stream ends with a 503
            for pid in client.run(os.getpid).values():
                os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable, match=r"stage 1 \(dask\) is unavailable"):
                _greedy(split, PROMPTS[0], 8)
            assert time.monotonic() - started < 15
        finally:
            rt.close()
