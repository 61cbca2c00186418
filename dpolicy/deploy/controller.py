"""``Controller``: the stateful receding-horizon runtime around any chunk policy.

``reset()`` then ``step(obs) -> action`` once per control period. The controller keeps the
observation history (an ``ObsHistory``: a fresh episode's first observation repeated ``To`` times) and
reads the policy's shapes and default steps from its ``spec`` (any ``Policy``); it either

* ``mode="chunked"`` (Diffusion Policy's way): a full solve from noise (``steps`` steps of the
  policy's sampler, or ``sampler=`` another one, e.g. DDPM), then ``execute`` (default ``Ta``)
  actions from the queue before the next solve; or
* ``mode="rti"`` (RTI-DP): one full solve on the first call, then every call shifts the previous
  normalized chunk by one, repeats its last action, re-noises it to the first of the short
  ``timesteps`` (``renoise=False``: feed it as is, as the RTI-DP code does), integrates only those
  steps (``k`` network evaluations, see ``schedule.py`` for what a timestep means for diffusion and
  flow) and executes the first action of the new chunk.

``discrete={-1: "clip"}`` (or ``"scale"``/``"threshold"``) marks binary dimensions (``schedule.py``).

**Fast path** (a ``ChunkPolicy``): each decision is a ``FastStep`` (``kernel.py``: the
``DecisionStep`` specialized to the batch size, time embeddings of its fixed timesteps and schedule
coefficients precomputed, the network replayed without per-module dispatch, bitwise equal to the
``DecisionStep``) on buffers allocated once — observation history, previous chunk, noise — run under
``torch.inference_mode``. Each observation is validated and normalized once, on the host, when it
arrives, so the history holds normalized observations and encoding is a view; only the executed
actions are unnormalized. The only host transfers per decision are the observation in and the
executed action(s) out. On CUDA the whole step (cold and warm separately) is captured in a CUDA
graph and replayed; ``compile=True`` wraps it in ``torch.compile`` first. Other policies
(compositions, steered policies) take the generic path through ``encode`` / ``field_fn`` /
``sample_loop`` (raw history), with the same results.

Batches: ``batch_size=B`` runs B independent episodes in lockstep (evaluation); ``reset(mask=...)``
restarts some of them. Each slot has its own noise generator (``reset(seed=...)`` reseeds), so a
slot's actions do not depend on what the other slots do.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping, Sequence

import numpy as np
import torch

from dpolicy.deploy.kernel import DecisionStep, DiscreteActions, FastStep, has_fast_form, shift_chunk
from dpolicy.deploy.schedule import parse_discrete, resolve_timesteps, warm_schedule
from dpolicy.errors import ConfigError, ShapeError
from dpolicy.policy.base import check_steps
from dpolicy.policy.history import ObsHistory
from dpolicy.process import sample_loop

MODES = ("chunked", "rti")


def slot_seed(seed: int, slot: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, slot, 0xC0417]).generate_state(1)[0])


class _Graphed:
    """A ``DecisionStep`` captured once in a CUDA graph over the controller's static buffers."""

    def __init__(self, fn, inputs: tuple, warmup: int = 3):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # lazy init (cuBLAS handles, compile) must happen outside the capture
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*inputs)

    def __call__(self, *_inputs):
        self.graph.replay()
        return self.outputs


@dataclasses.dataclass
class _Plan:
    """One kind of decision: its kernel (or None on the generic path) and its cost."""

    schedule: list
    evals: int
    kernel: object = None  # what runs: the FastStep, compiled or graph-captured (None: generic path)
    module: DecisionStep | None = None  # the eager DecisionStep (the reference, and what export writes)
    fast: FastStep | None = None  # module specialized to the controller's batch size (kernel before compile/capture)
    step_noise: torch.Tensor | None = None  # (S, B, Tp, Da) static buffer
    n_step_noise: int = 0  # how many of those S tensors are drawn (0 for deterministic schedules)
    noise_rows: list = dataclasses.field(default_factory=list)  # [slot][j]: views of step_noise[j, slot]


class Controller:
    def __init__(self, policy, mode: str = "rti", *, k: int | str = 3, timesteps: Sequence[int] | None = None,
                 steps: int | None = None, sampler: str | None = None, renoise: bool = True, execute: int | None = None,
                 discrete=None, levels: int = 100, batch_size: int = 1, seed: int = 0, fast: bool | None = None,
                 cuda_graph: bool | None = None, compile: bool = False):
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is unknown; choose one of {MODES}.")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1.")
        self.policy, self.mode, self.B = policy, mode, int(batch_size)
        self.device = torch.device(policy.device)
        spec = policy.spec
        self.To, self.Tp, self.Da = spec.To, spec.Tp, spec.action_dim
        self.obs_keys = list(spec.obs_keys)
        self.obs_dims = dict(spec.obs_dims)
        self.process = policy.process  # with another sampler of the same process when asked
        if sampler is not None and sampler != policy.process.sampler:
            self.process = policy.process.with_sampler(sampler)
        self.steps = check_steps(steps, spec.default_steps)
        self.execute = 1  # rti executes the first action of every decision
        if mode == "chunked":
            self.execute = spec.Ta if execute is None else execute
            if isinstance(execute, bool) or not isinstance(self.execute, numbers.Integral) or not 1 <= self.execute <= self.Tp:
                raise ConfigError(f"execute={execute!r} must be between 1 and Tp={self.Tp}.")
            self.execute = int(self.execute)
        self.renoise = bool(renoise)
        self.discrete = parse_discrete(discrete, self.Da)
        scale = spec.action_scale
        for d in self.discrete:
            if d.remedy == "scale" and (scale is None or not scale[d.dim] < 1.0):
                raise ConfigError(f"action dimension {d.dim} uses the 'scale' remedy but the policy was not trained with "
                                  f"policy.action_scale < 1 on it; retrain with it or use 'clip'.")
        if int(levels) < 1:
            raise ConfigError(f"levels={levels} must be at least 1.")
        self.timesteps: list[int] = []
        cold_schedule = self.process.schedule(self.steps)
        plans = {"cold": cold_schedule}
        if mode == "rti":
            self.timesteps = resolve_timesteps(self.process, k, timesteps, levels)
            plans["warm"] = warm_schedule(self.process, self.timesteps, levels)
        self.k = self.process.evals(plans.get("warm", cold_schedule))

        fast_ok = has_fast_form(policy) and self.process.denoising  # (regression: generic path)
        if fast is None:
            fast = fast_ok
        if fast and not fast_ok:
            raise ConfigError(f"fast=True needs a ChunkPolicy; a {type(policy).__name__} runs on the generic path (fast=False).")
        self.fast = bool(fast)
        if cuda_graph is None:
            cuda_graph = self.fast and self.device.type == "cuda"
        if cuda_graph and (self.device.type != "cuda" or not self.fast):
            raise ConfigError("cuda_graph=True needs the fast path on a CUDA device.")
        self.cuda_graph, self.compile = bool(cuda_graph), bool(compile)
        if self.compile and not self.fast:
            raise ConfigError("compile=True needs the fast path (a ChunkPolicy).")

        B, dev = self.B, self.device
        # the history: normalized observations on the fast path (what the FastStep reads), env units on the generic one
        self.history = ObsHistory(self.obs_keys, self.To, B, dev, self.obs_dims, shapes=spec.image_shapes)
        self._prev = torch.zeros(B, self.Tp, self.Da, device=dev)
        self._noise = torch.zeros(B, self.Tp, self.Da, device=dev)
        self._noise_rows = [self._noise[r] for r in range(B)]
        self._obs_norm = None  # (offset, scale) as float32 arrays: the fast path normalizes on arrival
        self._discrete_generic = None if self.fast else DiscreteActions(policy.normalizer.action, self.discrete, self.Da)
        self.plans: dict[str, _Plan] = {}
        for name, sched in plans.items():
            plan = _Plan(sched, self.process.evals(sched))
            if self.fast:
                kern = DecisionStep(policy, self.process, sched, warm=name == "warm", renoise=self.renoise,
                                    discrete=self.discrete).eval()
                plan.step_noise = torch.zeros(kern.n_step_noise, B, self.Tp, self.Da, device=dev)
                plan.fast = FastStep(kern, B, n_out=self.execute)
                plan.kernel = torch.compile(plan.fast.__call__) if self.compile else plan.fast
                plan.n_step_noise = kern.n_step_noise if kern.stochastic else 0
                plan.noise_rows = [[plan.step_noise[j, r] for j in range(plan.n_step_noise)] for r in range(B)]
                plan.module = kern
                if self._obs_norm is None:
                    self._obs_norm = (kern.obs_offset.detach().cpu().numpy().astype(np.float32),
                                      kern.obs_scale.detach().cpu().numpy().astype(np.float32))
            else:
                plan.noise_rows = [[] for _ in range(B)]  # the generic path draws per-step noise inside sample_loop
            self.plans[name] = plan
        self._graphs_ready = False
        self._gens = [torch.Generator(device=dev).manual_seed(slot_seed(seed, r)) for r in range(B)]
        self._fresh = np.ones(B, dtype=bool)  # history must be filled from the next observation
        self._has_chunk = np.zeros(B, dtype=bool)
        self._queue = np.zeros((B, self.execute, self.Da), dtype=np.float32)
        self._queue_pos = np.full(B, self.execute)
        self._primed = np.zeros(B, dtype=bool)  # RTI: the next step returns the primed chunk's first action
        self.last_evals = np.zeros(B, dtype=np.int64)  # network evaluations per slot in the last step
        self._steady = False  # rti: every slot has a chunk, none is primed or fresh (the per-decision fast branch)
        self._all_rows = np.arange(B)
        self.decisions = 0
        self.total_evals = 0

    # -- public API --------------------------------------------------------------------------------------
    @property
    def last_nfe(self) -> int:
        """Network evaluations the last ``step`` spent (the largest over slots)."""
        return int(self.last_evals.max())

    def describe(self) -> dict:
        return {"mode": self.mode, "process": self.process.name,
                "sampler": getattr(self.process, "sampler", None), "steps": self.steps, "timesteps": self.timesteps,
                "k": self.k, "cold_evals": self.plans["cold"].evals, "renoise": self.renoise, "execute": self.execute,
                "discrete": {d.dim: d.remedy for d in self.discrete}, "fast": self.fast, "cuda_graph": self.cuda_graph,
                "compile": self.compile, "batch_size": self.B, "device": str(self.device)}

    def reset(self, mask: Sequence[bool] | np.ndarray | None = None, seed: int | Sequence[int] | None = None) -> None:
        """Start new episodes in the masked slots (all by default): empty queue, no warm chunk, history
        refilled from the next observation. ``seed`` (one int, or one per masked slot) reseeds their noise."""
        mask = np.ones(self.B, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
        if mask.shape != (self.B,):
            raise ShapeError(f"reset mask has shape {mask.shape}; expected ({self.B},) for batch_size={self.B}.")
        rows = np.nonzero(mask)[0]
        if seed is not None:
            seeds = [seed] * len(rows) if np.ndim(seed) == 0 else list(seed)
            if len(seeds) != len(rows):
                raise ConfigError(f"reset got {len(seeds)} seed(s) for {len(rows)} slot(s).")
            for r, s in zip(rows, seeds):
                self._gens[r].manual_seed(slot_seed(int(s), 0))
        self._fresh[rows] = True
        self._has_chunk[rows] = False
        self._queue_pos[rows] = self.execute
        self._primed[rows] = False
        self._steady = False

    def step(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """One control decision: observation dict (``(d,)`` per key, or ``(B, d)``) -> action (``(Da,)`` / ``(B, Da)``)."""
        batched = self._read_obs(obs)
        with torch.inference_mode():
            self._push_obs()
            out = self._decide()
        return out if batched else out[0]

    __call__ = step

    def prime(self, obs: Mapping[str, np.ndarray]) -> None:
        """Do the full solve of freshly reset slots now, from their first observation, off the control clock
        (RTI's preparation phase: the robot has not started moving). The next ``step`` with the same
        observation then returns that solve's first action without evaluating the network."""
        self._read_obs(obs)
        fresh = self._fresh.copy()
        if not fresh.any():
            return
        rows = np.nonzero(fresh)[0]
        self._steady = False
        with torch.inference_mode():
            self._push_obs(only_fresh=True)
            chunk, act = self._run("cold", rows)
            m = torch.as_tensor(fresh, device=self.device)[:, None, None]
            self._prev.copy_(torch.where(m, chunk, self._prev))
            host = act[:, :self.execute].to("cpu", torch.float32).numpy()
        self._queue[rows] = host[rows]
        self._queue_pos[rows] = 0
        self._has_chunk[rows] = True
        self._primed[rows] = self.mode == "rti"
        self._fresh[rows] = True  # the step that follows refills the history from the same observation
        self.total_evals += self.plans["cold"].evals * len(rows)

    # -- observations ------------------------------------------------------------------------------------
    def _read_obs(self, obs) -> bool:
        """Validate an observation dict and write it into the history's row buffer (``(B, Dobs)`` float32, keys
        in ``obs_keys`` order, normalized on the fast path); return whether it was batched."""
        row, batched = self.history.read(obs, check_finite=True)
        if self._obs_norm is not None:  # = DecisionStep.encode's (obs - offset) * scale, float32, elementwise
            np.subtract(row, self._obs_norm[0], out=row)
            np.multiply(row, self._obs_norm[1], out=row)
        return batched

    def _push_obs(self, only_fresh: bool = False) -> None:
        """Slide the history by one and write the row just read; fresh slots get it ``To`` times.
        ``only_fresh`` leaves the other slots' histories alone (``prime``)."""
        fresh = self._fresh if self._fresh.any() else None
        self.history.push(slots=np.zeros(self.B, dtype=bool) if only_fresh else None, fresh=fresh)
        if fresh is not None:
            self._fresh[:] = False

    # -- decisions -----------------------------------------------------------------------------------------
    def _draw(self, rows: np.ndarray, plan: _Plan, need_noise: bool) -> None:
        """Per-slot noise for ``rows``, drawn in the order the eager sampler would draw it."""
        randn, shape, dev = torch.randn, (self.Tp, self.Da), self.device
        for r in rows:
            g = self._gens[r]
            if need_noise:
                randn(shape, device=dev, generator=g, out=self._noise_rows[r])
            for buf in plan.noise_rows[r]:
                randn(shape, device=dev, generator=g, out=buf)

    def _run(self, name: str, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Run decision kind ``name`` on the whole batch (only ``rows`` get fresh noise); (chunk, actions)."""
        plan = self.plans[name]
        warm = name == "warm"
        self._draw(rows, plan, need_noise=(not warm) or self.renoise)
        if self.fast:
            if self.cuda_graph and not self._graphs_ready:
                self._capture()
            return plan.kernel(self._prev, self.history.buffer, self._noise, plan.step_noise)
        return self._run_generic(plan, warm, rows)

    def _run_generic(self, plan: _Plan, warm: bool, rows: np.ndarray):
        pol = self.policy
        cond = pol.encode(self.history.views())
        fn = pol.field_fn(cond) if warm or self.process is not pol.process else None
        g = self._gens[int(rows[0])] if len(rows) else None  # per-step (DDPM) noise: one stream on this path
        if warm:
            x = self._discrete_generic.binarize(shift_chunk(self._prev, 1))
            if self.renoise:
                x = self.process.noise_to(x, self._noise, plan.schedule[0][0])
            chunk = sample_loop(self.process, fn, x, plan.schedule, g)
        elif fn is not None:
            chunk = sample_loop(self.process, fn, self.process.from_noise(self._noise.clone()), plan.schedule, g)
        else:
            chunk = pol.sample_normalized(cond, self._noise.clone(), self.steps, g)
        return chunk, self._discrete_generic.threshold(pol.normalizer.action.unnormalize(chunk))

    def _capture(self) -> None:
        for plan in self.plans.values():
            plan.kernel = _Graphed(plan.kernel, (self._prev, self.history.buffer, self._noise, plan.step_noise))
        self._graphs_ready = True

    def _decide(self) -> np.ndarray:
        if self._steady:  # rti, every slot mid-episode: shift, re-noise, k evaluations, first action out
            plan = self.plans["warm"]
            chunk, act = self._run("warm", self._all_rows)
            self._prev.copy_(chunk)
            self.last_evals.fill(plan.evals)
            self.decisions += 1
            self.total_evals += plan.evals * self.B
            return act[:, 0].to("cpu", torch.float32).numpy().copy()  # the one transfer per decision
        self.last_evals[:] = 0
        if self.mode == "chunked":
            need = self._queue_pos >= self.execute
            if need.any():
                rows = np.nonzero(need)[0]
                chunk, act = self._run("cold", rows)
                host = act[:, :self.execute].to("cpu", torch.float32).numpy()  # the one transfer per re-plan
                self._queue[rows] = host[rows]
                self._queue_pos[rows] = 0
                self.last_evals[rows] = self.plans["cold"].evals
            out = self._queue[self._all_rows, self._queue_pos].copy()
            self._queue_pos += 1
        elif self._primed.all():  # every slot's decision was made by prime()
            out = self._queue[:, 0].copy()
            self._primed[:] = False
            self._steady = True
        else:
            primed = self._primed.copy()
            keep = self._prev.clone() if primed.any() else None
            cold = ~self._has_chunk
            if cold.all():
                chunk, act = self._run("cold", np.arange(self.B))
                self._prev.copy_(chunk)
            elif not cold.any():
                chunk, act = self._run("warm", np.nonzero(~primed)[0])
                self._prev.copy_(chunk)
            else:  # some slots start an episode: both kinds, merged per slot
                c_chunk, c_act = self._run("cold", np.nonzero(cold)[0])
                c_chunk, c_act = c_chunk.clone(), c_act.clone()  # graph outputs are overwritten by the next replay
                w_chunk, w_act = self._run("warm", np.nonzero(~cold & ~primed)[0])
                m = torch.as_tensor(cold, device=self.device)[:, None, None]
                self._prev.copy_(torch.where(m, c_chunk, w_chunk))
                act = torch.where(m, c_act, w_act)
            self.last_evals[:] = np.where(cold, self.plans["cold"].evals, self.plans["warm"].evals)
            self._has_chunk[:] = True
            out = act[:, 0].to("cpu", torch.float32).numpy().copy()  # the one transfer per decision
            if keep is not None:  # primed slots: their chunk stays, their action is the primed one
                m = torch.as_tensor(primed, device=self.device)[:, None, None]
                self._prev.copy_(torch.where(m, keep, self._prev))
                out[primed] = self._queue[primed, 0]
                self.last_evals[primed] = 0
                self._primed[:] = False
            self._steady = True  # every slot now holds a chunk and none is primed
        self.decisions += 1
        self.total_evals += int(self.last_evals.sum())
        return out

    # -- export --------------------------------------------------------------------------------------------
    def decision_step(self, kind: str = "warm") -> DecisionStep:
        """The eager ``DecisionStep`` behind decisions of ``kind`` ("warm" for RTI steps, "cold" for full solves)."""
        if not self.fast:
            raise ConfigError("only the fast path (a ChunkPolicy) has a DecisionStep to export.")
        if kind not in self.plans:
            raise ConfigError(f"this {self.mode} controller has no {kind!r} decisions; it has {sorted(self.plans)}.")
        return self.plans[kind].module

    def export(self, path, kind: str = "warm"):
        """Write the decision step as a ``torch.export`` program (see ``dpolicy.deploy.export``)."""
        from dpolicy.deploy.export import export_step

        return export_step(self.decision_step(kind), path, batch_size=self.B,
                           meta={"obs_keys": self.obs_keys, "obs_dims": self.obs_dims,
                                 "image_shapes": {k: list(v) for k, v in self.policy.image_shapes.items()},
                                 "controller": self.describe()})
