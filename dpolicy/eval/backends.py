"""Where the environments of a rollout live: in this process, in worker processes, or in Ray actors.

``backend=local`` steps a gymnasium sync vector env in the calling process. ``backend=subprocess`` and
``backend=ray`` spread the same ``n_envs`` env slots over ``workers`` workers (contiguous blocks of slots,
several envs per worker): child processes of this one, or Ray actors on a local or existing cluster
(``address``). The policy stays on the caller's device in every case: each env step is one batched call
per worker (all workers in parallel), and the policy's batched ``act`` sees exactly the batches it would
see locally. So the episode loop, its slot bookkeeping and the policy's noise streams are the local ones,
and the same seeds give the same per-episode results under every backend and any worker count.

Fault tolerance: the pool logs, per slot, the seed of the running episode and every action sent since
its reset. When a worker dies (killed, out of memory, a lost node), a fresh worker replaces it, replays
the log of each of its slots (environments are deterministic given seed and actions) to the step where
the old one died, and the call that failed is made again. The episode loop never sees the failure: every
seed is played exactly once and its result is the one an uninterrupted run gives.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dpolicy.config import BACKENDS, RolloutBackend, set_default_backend  # noqa: F401  (the settings live with the configs)
from dpolicy.errors import ConfigError, DPolicyError

RAY_INSTALL = 'pip install "ray>=2.40"  (or the extra: pip install -e ".[ray]")'


class WorkerLost(DPolicyError, RuntimeError):
    """A rollout worker died (its process is gone); the pool replaces it."""


class RolloutError(DPolicyError, RuntimeError):
    """A rollout worker kept dying: the evaluation cannot go on."""


def _subprocess_start() -> str | None:
    """The start method of async sub-envs: fork (the fastest, None) unless this process has already rendered
    offscreen (image observations, a video), whose GL driver state a forked child cannot use (its first render
    would hang). Then the sub-envs come from a fork server, a fresh process that imports the tasks once and
    never renders."""
    base = sys.modules.get("dpolicy_envs.base")
    if base is None or not base.rendering_started():
        return None
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(["dpolicy_envs", "dpolicy.tasks"])
    return "forkserver"


def make_vector_env(env_fn: Callable[[], object], n_envs: int, vector: str = "sync"):
    """A vector env with autoreset disabled: the evaluation loop resets slots itself, with seeds."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    fns = [env_fn] * n_envs
    if vector == "sync":
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    if vector == "async":
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED, context=_subprocess_start())
    raise ConfigError(f"vector={vector!r} is not a vector env kind; use 'sync' or 'async'.")



class EnvWorker:
    """A worker's envs (its block of slots), stepped on request. Runs in a child process or a Ray actor."""

    def __init__(self, env_fn: Callable[[], object], n: int):
        self.env_fn = env_fn
        self.envs = [env_fn() for _ in range(n)]
        self.policy, self.venv = None, None

    def pid(self) -> int:
        return os.getpid()

    def reset(self, idx: Sequence[int], seeds: Sequence[int]) -> list:
        return [self.envs[i].reset(seed=None if s is None else int(s)) for i, s in zip(idx, seeds)]

    def step(self, idx: Sequence[int], actions: Sequence[np.ndarray]) -> list:
        out = []
        for i, a in zip(idx, actions):
            obs, r, te, tr, info = self.envs[i].step(a)
            out.append((obs, float(r), bool(te), bool(tr), info))
        return out

    def replay(self, idx: Sequence[int], seeds: Sequence[int], actions: Sequence[Sequence[np.ndarray]]) -> int:
        """Bring env ``idx[k]`` to where a reset with ``seeds[k]`` followed by ``actions[k]`` leaves it."""
        n = 0
        for i, s, acts in zip(idx, seeds, actions):
            self.envs[i].reset(seed=None if s is None else int(s))
            for a in acts:
                self.envs[i].step(a)
            n += len(acts)
        return n

    # -- placement=workers: the worker holds a copy of the policy and plays whole shards of episodes ----------
    def load_policy(self, payload) -> None:
        """The policy copy (pickled bytes from the caller) or, in the caller's own process, the policy itself."""
        if isinstance(payload, bytes):
            import cloudpickle
            import torch

            torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
            payload = cloudpickle.loads(payload)
        self.policy = payload

    def run_shard(self, seeds: Sequence[int], n_envs: int, kwargs: dict) -> tuple[list, int]:
        from dpolicy.eval.runner import policy_inference, run_episodes

        if self.venv is None or self.venv.num_envs != n_envs:
            if self.venv is not None:
                self.venv.close()
            self.venv = make_vector_env(self.env_fn, n_envs)
        with policy_inference(self.policy):
            return run_episodes(self.policy, self.venv, list(seeds), **kwargs)

    def close(self) -> None:
        for env in self.envs:
            env.close()
        if self.venv is not None:
            self.venv.close()


# -- worker pools: submit a call to worker w, collect its result (WorkerLost when the worker died) ------------
def _serve(conn, payload: bytes, n: int) -> None:
    import cloudpickle

    worker = EnvWorker(cloudpickle.loads(payload), n)
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        try:
            reply = ("ok", getattr(worker, method)(*args))
        except Exception as e:  # the caller re-raises it: an env's own error is not a lost worker
            reply = ("error", e)
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result or exception
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
        if method == "close":
            break
    conn.close()


class _ProcessPool:
    def __init__(self, env_fn, sizes: list[int]):
        import cloudpickle

        import multiprocessing

        self.ctx = multiprocessing.get_context(_subprocess_start() or "fork")
        self.payload, self.sizes = cloudpickle.dumps(env_fn), sizes
        self.procs: list = [None] * len(sizes)
        self.conns: list = [None] * len(sizes)
        for w in range(len(sizes)):
            self._start(w)

    def _start(self, w: int) -> None:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_serve, args=(child, self.payload, self.sizes[w]), daemon=True,
                             name=f"dpolicy-env-worker-{w}")
        p.start()
        child.close()
        self.procs[w], self.conns[w] = p, parent

    def submit(self, w: int, method: str, *args):
        try:
            self.conns[w].send((method, args))
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            return ("lost", w)
        return ("sent", w)

    def result(self, handle):
        state, w = handle
        if state == "lost":
            raise WorkerLost(f"env worker {w} (pid {self.procs[w].pid}) is gone.")
        try:
            status, value = self.conns[w].recv()
        except (EOFError, ConnectionResetError, OSError):
            raise WorkerLost(f"env worker {w} (pid {self.procs[w].pid}) is gone.") from None
        if status == "error":
            raise value
        return value

    def ready(self, handles: list) -> list[int]:
        """Indices of ``handles`` whose result can be collected now (waits until there is one)."""
        from multiprocessing.connection import wait

        by_conn = {id(self.conns[w]): k for k, (_, w) in enumerate(handles)}
        lost = [k for k, (state, _) in enumerate(handles) if state == "lost"]
        if lost:
            return lost
        return [by_conn[id(c)] for c in wait([self.conns[w] for _, w in handles])]

    def pid(self, w: int) -> int:
        return int(self.procs[w].pid)

    def worker_pids(self) -> list[int]:
        return [self.pid(w) for w in range(len(self.procs))]

    def restart(self, w: int) -> None:
        p = self.procs[w]
        if p.is_alive():
            p.kill()
        p.join(timeout=10)
        self.conns[w].close()
        self._start(w)

    def close(self) -> None:
        for w, p in enumerate(self.procs):
            if p is None:
                continue
            if p.is_alive():
                try:
                    self.conns[w].send(("close", ()))
                    self.conns[w].recv()
                except (BrokenPipeError, EOFError, OSError):
                    pass
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
            self.conns[w].close()


def ray_init(address: str | None = None, num_cpus: int | None = None):
    """Import Ray and connect: to ``address`` when given (or ``RAY_ADDRESS``), else to a local cluster started
    here (reused if this process already started one)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"backend=ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or os.environ["RAY_ADDRESS"], **kwargs)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    return ray


class _RayPool:
    def __init__(self, env_fn, sizes: list[int], backend: RolloutBackend):
        # a local cluster started here gets logical CPUs for every worker and a replacement (if this machine has fewer)
        need = math.ceil(len(sizes) * backend.cpus_per_worker) + 1
        self.ray = ray_init(backend.address, num_cpus=max(os.cpu_count() or 1, need))
        self.env_fn, self.sizes = env_fn, sizes
        self.cls = self.ray.remote(num_cpus=backend.cpus_per_worker, max_restarts=0)(EnvWorker)
        self.start_timeout, self.cpus_per_worker = 300.0, backend.cpus_per_worker
        self.actors: list = [None] * len(sizes)
        self.pid_refs: list = [None] * len(sizes)
        for w in range(len(sizes)):
            self._start(w)

    def _start(self, w: int) -> None:
        self.actors[w] = self.cls.remote(self.env_fn, self.sizes[w])
        self.pid_refs[w] = self.actors[w].pid.remote()  # first in the actor's queue: never waits behind a shard
        ready, _ = self.ray.wait([self.pid_refs[w]], timeout=self.start_timeout)
        if not ready:  # an actor the cluster cannot place (no free CPU) would otherwise hang the rollout
            raise RolloutError(f"Ray did not start env actor {w} within {self.start_timeout:.0f} s: the cluster has no "
                               f"free resources for it (each actor reserves cpus_per_worker={self.cpus_per_worker}).")

    def submit(self, w: int, method: str, *args):
        return getattr(self.actors[w], method).remote(*args)

    def result(self, handle):
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(handle)
        except RayActorError as e:
            raise WorkerLost(f"env actor died: {str(e).splitlines()[0]}") from None
        except RayTaskError as e:  # the env's own error, raised again as itself
            raise e.as_instanceof_cause() from None

    def ready(self, handles: list) -> list[int]:
        done, _ = self.ray.wait(list(handles), num_returns=1)
        return [k for k, h in enumerate(handles) if h in done]

    def pid(self, w: int) -> int:
        return int(self.ray.get(self.pid_refs[w]))

    def worker_pids(self) -> list[int]:
        return [self.pid(w) for w in range(len(self.actors))]

    def restart(self, w: int) -> None:
        try:
            self.ray.kill(self.actors[w], no_restart=True)
        except Exception:  # already gone
            pass
        self._start(w)

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.get(a.close.remote(), timeout=30)
            except Exception:  # a dead actor has nothing left to close
                pass
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass


def split_slots(n: int, workers: int) -> list[int]:
    """Block sizes of ``n`` slots over ``min(workers, n)`` workers, as even as possible (larger blocks first)."""
    w = max(1, min(workers, n))
    return [n // w + (1 if i < n % w else 0) for i in range(w)]


class PooledEnvs:
    """``n`` env slots on a pool of workers, stepped a batch of slots at a time (``reset_slots``, ``step_slots``),
    with the slot log that lets a replacement worker replay what a dead one had done."""

    def __init__(self, env_fn: Callable[[], object], n: int, backend: RolloutBackend):
        if n < 1:
            raise ConfigError(f"n_envs={n} must be at least 1.")
        self.n, self.backend = n, backend
        self.sizes = split_slots(n, backend.workers)
        self.owner = [(w, i) for w, size in enumerate(self.sizes) for i in range(size)]
        self.pool = make_pool(env_fn, self.sizes, backend)
        self.log_seed: list[int | None] = [None] * n
        self.log_actions: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.logged = [False] * n  # the slot was ever reset (only those have a state to replay)
        self.restarts = [0] * len(self.sizes)
        self.replayed_steps = 0
        self.calls = 0  # batched calls made (one per worker involved per reset/step)

    def __len__(self) -> int:
        return self.n

    @property
    def num_envs(self) -> int:
        return self.n

    @property
    def workers(self) -> int:
        return len(self.sizes)

    def worker_pids(self) -> list[int]:
        return [self.pool.pid(w) for w in range(self.workers)]

    def _call(self, method: str, rows: Sequence[int], args: Sequence) -> list:
        by_worker: dict[int, list[int]] = {}
        for k, r in enumerate(rows):
            by_worker.setdefault(self.owner[r][0], []).append(k)
        out: list = [None] * len(rows)
        pending = {w: self.pool.submit(w, method, [self.owner[rows[k]][1] for k in ks], [args[k] for k in ks])
                   for w, ks in by_worker.items()}
        self.calls += len(pending)
        while pending:
            w, handle = next(iter(pending.items()))
            ks = by_worker[w]
            try:
                vals = self.pool.result(handle)
            except WorkerLost as e:
                self._recover(w, e)
                pending[w] = self.pool.submit(w, method, [self.owner[rows[k]][1] for k in ks], [args[k] for k in ks])
                continue
            for k, v in zip(ks, vals):
                out[k] = v
            del pending[w]
        return out

    def _recover(self, w: int, err: Exception) -> None:
        note_restart(self.restarts, w, self.backend, err, "its episodes are replayed from their seeds and actions")
        self.pool.restart(w)
        slots = [r for r, (ow, _) in enumerate(self.owner) if ow == w and self.logged[r]]
        if slots:
            handle = self.pool.submit(w, "replay", [self.owner[r][1] for r in slots], [self.log_seed[r] for r in slots],
                                      [self.log_actions[r] for r in slots])
            try:
                self.replayed_steps += int(self.pool.result(handle))
            except WorkerLost as e:
                self._recover(w, e)

    def reset_slots(self, rows: Sequence[int], seeds: Sequence[int | None]) -> list:
        rows = [int(r) for r in rows]
        out = self._call("reset", rows, list(seeds))
        for r, s in zip(rows, seeds):
            self.log_seed[r], self.log_actions[r], self.logged[r] = s, [], True
        return out

    def step_slots(self, rows: Sequence[int], actions: Sequence[np.ndarray]) -> list:
        rows = [int(r) for r in rows]
        acts = [np.array(a, copy=True) for a in actions]
        out = self._call("step", rows, acts)
        for r, a in zip(rows, acts):
            self.log_actions[r].append(a)
        return out

    def close(self) -> None:
        self.pool.close()


def make_pool(env_fn, sizes: list[int], backend: RolloutBackend):
    return _RayPool(env_fn, sizes, backend) if backend.kind == "ray" else _ProcessPool(env_fn, sizes)


def _policy_payload(policy, backend: RolloutBackend):
    """The policy as the workers receive it: a CPU copy, pickled once (Ray: put in the object store once)."""
    import copy

    import cloudpickle

    cpu = policy if str(getattr(policy, "device", "cpu")) == "cpu" else copy.deepcopy(policy).to("cpu")
    data = cloudpickle.dumps(cpu)
    if backend.kind == "ray":
        import ray

        return ray.put(data)
    return data


class _LocalPool:
    """The pool protocol in this process: a call runs when submitted (placement=workers with backend=local)."""

    def __init__(self, env_fn, sizes: list[int]):
        self.workers = [EnvWorker(env_fn, n) for n in sizes]

    def submit(self, w: int, method: str, *args):
        try:
            return ("ok", getattr(self.workers[w], method)(*args))
        except Exception as e:  # raised by result(), as the other pools do
            return ("error", e)

    def result(self, handle):
        status, value = handle
        if status == "error":
            raise value
        return value

    def ready(self, handles: list) -> list[int]:
        return list(range(len(handles)))

    def worker_pids(self) -> list[int]:
        return [os.getpid()] * len(self.workers)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def note_restart(restarts: list[int], w: int, backend: RolloutBackend, err: Exception, what: str) -> None:
    """Count a replacement of worker ``w`` (RolloutError past ``max_restarts``) and say what is being redone."""
    restarts[w] += 1
    if restarts[w] > backend.max_restarts:
        raise RolloutError(f"rollout worker {w} died {restarts[w]} times (limit max_restarts={backend.max_restarts}); "
                           f"last: {err}")
    print(f"rollouts: {err} Replacing worker {w}; {what} (restart {restarts[w]}/{backend.max_restarts}).",
          file=sys.stderr, flush=True)


def run_sharded(policy, env_fn, seeds: Sequence[int], backend: RolloutBackend, shard: int, kwargs: dict,
                on_episode: Callable | None = None) -> tuple[list, int, int]:
    """Play ``seeds`` in fixed shards of ``shard`` consecutive seeds, each on ``shard`` env slots with the policy
    running in the worker that plays it (``placement=workers``). Shards go to whichever worker is free; a dead
    worker's shard is played again, whole, by its replacement, and a shard's records are taken once. The shards
    do not depend on the backend or the worker count, so neither do the results. ``on_episode(record, pool)`` is
    called as shards come back. Returns the records (in seed order), the policy calls and the worker restarts."""
    seeds = [int(s) for s in seeds]
    shards = [seeds[i:i + shard] for i in range(0, len(seeds), shard)]
    n_workers = 1 if backend.kind == "local" else max(1, min(backend.workers, len(shards)))
    pool = _LocalPool(env_fn, [0]) if backend.kind == "local" else make_pool(env_fn, [0] * n_workers, backend)
    restarts = [0] * n_workers
    try:
        payload = policy if backend.kind == "local" else _policy_payload(policy, backend)
        for w in range(n_workers):
            pool.result(pool.submit(w, "load_policy", payload))
        todo = list(range(len(shards)))
        inflight: dict[int, tuple[int, object]] = {}  # worker -> (shard, handle)
        results: dict[int, tuple[list, int]] = {}
        while todo or inflight:
            for w in range(n_workers):
                if w not in inflight and todo:
                    j = todo.pop(0)
                    inflight[w] = (j, pool.submit(w, "run_shard", shards[j], len(shards[j]), kwargs))
            ws = list(inflight)
            for k in pool.ready([inflight[w][1] for w in ws]):
                w = ws[k]
                j, handle = inflight.pop(w)
                try:
                    recs, c = pool.result(handle)
                except WorkerLost as e:
                    note_restart(restarts, w, backend, e, f"its shard of {len(shards[j])} episodes is played again")
                    pool.restart(w)
                    pool.result(pool.submit(w, "load_policy", payload))
                    todo.insert(0, j)
                    continue
                if j in results:  # never: a shard is in flight on one worker at a time
                    raise RolloutError(f"shard {j} came back twice.")
                results[j] = (recs, c)
                for rec in recs if on_episode else ():
                    on_episode(rec, pool)
    finally:
        pool.close()
    records = [rec for j in range(len(shards)) for rec in results[j][0]]
    return records, sum(c for _, c in results.values()), sum(restarts)


def kill_worker_after(n: int, victim: int = 0):
    """Fault injection for tests and benchmarks: an ``episode_hook`` for ``evaluate`` that SIGKILLs worker ``victim``
    once ``n`` episodes have finished. Returns ``(hook, state)``; ``state["pid"]`` is the killed process."""
    import signal

    state = {"n": 0, "pid": None}

    def hook(rec, workers):
        state["n"] += 1
        if state["pid"] is None and state["n"] >= n and workers is not None:
            state["pid"] = workers.worker_pids()[victim]
            os.kill(state["pid"], signal.SIGKILL)

    return hook, state


def make_rollout_envs(env_fn: Callable[[], object], n_envs: int, backend: RolloutBackend | str | None = None):
    """The env slots of a rollout: a sync vector env (local) or a ``PooledEnvs`` on worker processes or Ray actors."""
    backend = RolloutBackend.of(backend)
    if backend.kind == "local":
        return make_vector_env(env_fn, n_envs)
    return PooledEnvs(env_fn, n_envs, backend)


def call_overhead(backend: RolloutBackend | str, workers: int = 1, calls: int = 200) -> float:
    """Median seconds of one round trip to a worker that does nothing (the per-call cost a rollout pays per step)."""
    backend = RolloutBackend.of(backend, workers)
    envs = PooledEnvs(_NullEnv, workers, backend)
    try:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            envs._call("step", [0], [np.zeros(1)])
            times.append(time.perf_counter() - t0)
    finally:
        envs.close()
    return float(np.median(times))


class _NullEnv:
    """An env whose step costs nothing: what is left of a round trip is the backend's overhead."""

    def reset(self, seed=None):
        return {}, {}

    def step(self, action):
        return {}, 0.0, False, False, {}

    def close(self):
        pass
