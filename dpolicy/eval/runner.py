"""Episodes on a batch of env slots: the one episode loop of evaluation, controller evaluation and DSRL.

``EpisodeRunner`` drives ``n`` env slots: the sub-envs of a gymnasium vector env (stepped together; a
slot without an episode steps with a harmless in-bounds action and is ignored) or a plain list of envs
(stepped one by one, only the slots asked for). Episodes take their seeds from a fixed list (handed to
slots as they free up, results stored by episode index, so the outcome does not depend on how many
slots there are) or, endlessly, from ``next_seed()``. Resets are managed here (a vector env is built with
``AutoresetMode.DISABLED``), so no hidden autoreset step is ever counted and every reset gets its
episode's seed. Per slot the runner keeps the running episode's return, length, success, instability
and mode, and makes an ``EpisodeRecord`` when it ends (terminated, truncated or ``max_steps``).

What decides the actions is the caller's; the observation history is an ``ObsHistory``:

* ``run_episodes`` (below, behind ``dpolicy.eval.evaluate``): a policy's chunks, executed ``Ta`` actions
  at a time from a per-slot queue; only slots whose queue is empty are re-planned, all of them in one
  batched ``policy.act`` call, and the executed part is copied to the host once per re-plan. Latent
  noise is drawn per episode from a generator seeded by the episode's seed, so a stochastic policy also
  gives the same episodes whatever the batch composition;
* ``dpolicy.deploy.evaluate_controller``: a ``Controller`` step per env step (the controller keeps the
  history);
* ``dpolicy.rl.NoiseActionEnv``: one RL action is up to ``Ta`` env steps per slot, a slot stopping where
  its episode ends, and the resets wait until the whole batch has executed its chunks.

The first two call ``run(decide, begin, observe)``; the noise-action env drives ``reset`` / ``step`` /
``restart`` itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from dpolicy.errors import ConfigError, ShapeError
from dpolicy.policy.history import ObsHistory

# Salt mixed into the episode seed for the policy's noise stream, so the env's and the policy's
# random streams are not the same numbers.
_NOISE_SALT = 0x5EED_D1FF


@dataclass
class EpisodeRecord:
    seed: int
    success: bool
    ret: float
    length: int
    mode: int | None  # last ``info["mode"]`` reported, None if the env never reports one
    unstable: bool


@dataclass
class SlotStep:
    """One env step of the runner's slots (arrays of length ``n``; entries of slots not stepped are zero)."""

    obs: dict  # every slot's current observation, ``(n, ...)`` per key (the final one where an episode ended)
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    ended: np.ndarray  # a running episode ended at this step (terminated, truncated or max_steps)
    success: np.ndarray  # this step's ``info["is_success"]``


@contextmanager
def policy_inference(policy):
    """``torch.inference_mode`` with the policy in eval mode (dropout off), restoring its mode after."""
    was_training = bool(getattr(policy, "training", False))
    if was_training:
        policy.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            policy.train()


def info_field(info: dict, key: str, n: int, default, dtype) -> np.ndarray:
    """Read a per-env field from a vector-env info dict (values + ``_key`` presence mask)."""
    out = np.full(n, default, dtype=dtype)
    if key in info:
        mask = np.asarray(info.get("_" + key, np.ones(n, dtype=bool)), dtype=bool)
        vals = np.asarray(info[key])
        for i in np.nonzero(mask)[0]:
            v = vals[i]
            out[i] = default if v is None else v
    return out


class EpisodeRunner:
    def __init__(self, envs, seeds: Sequence[int] | None = None, *, next_seed: Callable[[], int] | None = None,
                 max_steps: int | None = None, on_episode: Callable[[EpisodeRecord], None] | None = None,
                 on_frame: Callable[[object, np.ndarray], None] | None = None):
        """``envs``: a gymnasium vector env (autoreset disabled) or a list of envs. Exactly one of ``seeds`` (the
        episodes to run, one seed each) and ``next_seed`` (endless episodes) is given. ``on_episode(record)`` is
        called as each episode ends; ``on_frame(envs, slots)`` after every reset and step, ``slots`` (bool per
        slot) naming the slots whose current state is a frame of a real episode."""
        if (seeds is None) == (next_seed is None):
            raise ConfigError("an episode runner takes either a list of seeds or a next_seed function.")
        self.envs = envs
        # three kinds of env slots: a gymnasium vector env, a list of envs, or a pool stepping a batch of slots per
        # call (``reset_slots`` / ``step_slots``, dpolicy.eval.backends), which is driven like the list
        self.pooled = hasattr(envs, "step_slots")
        self.vector = not self.pooled and not isinstance(envs, (list, tuple))
        self.n = int(envs.num_envs) if self.vector else len(envs)
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        self.next_seed, self.max_steps = next_seed, max_steps
        self.on_episode, self.on_frame = on_episode, on_frame
        if self.vector:
            space = envs.single_action_space
            # Slots without an episode must still be stepped (vector envs step all slots); give them a
            # harmless in-bounds action and ignore what they do.
            self.idle_action = np.clip(np.zeros(space.shape), space.low, space.high).astype(space.dtype)
        self._clear()

    def _clear(self) -> None:
        n = self.n
        self.records: list[EpisodeRecord | None] = [None] * len(self.seeds) if self.seeds is not None else []
        self.slot_ep = np.full(n, -1)  # episode index per slot, -1 = idle
        self.slot_seed: list[int | None] = [None] * n
        self.ret = np.zeros(n)
        self.length = np.zeros(n, dtype=np.int64)
        self.success = np.zeros(n, dtype=bool)
        self.unstable = np.zeros(n, dtype=bool)
        self.mode: list[int | None] = [None] * n
        self.next_ep = 0
        self._env_done = np.zeros(n, dtype=bool)  # the slot's env finished (idle slots' throwaway episodes too)
        self._ended = np.zeros(n, dtype=bool)
        self._obs: list[dict] = [{} for _ in range(n)]  # list of envs: each slot's current observation

    @property
    def active(self) -> np.ndarray:
        """Slots running an episode."""
        return self.slot_ep >= 0

    def _assign(self, slot: int) -> int | None:
        """Give ``slot`` the next episode (returns its seed) or mark it idle (returns None)."""
        self.ret[slot], self.length[slot], self.success[slot], self.unstable[slot] = 0.0, 0, False, False
        self.mode[slot] = None
        if self.seeds is not None and self.next_ep >= len(self.seeds):
            self.slot_ep[slot], self.slot_seed[slot] = -1, None
            return None
        self.slot_ep[slot], self.next_ep = self.next_ep, self.next_ep + 1
        s = self.seeds[self.slot_ep[slot]] if self.seeds is not None else int(self.next_seed())
        self.slot_seed[slot] = s
        return s

    def _stacked(self) -> dict:
        return {k: np.stack([np.asarray(o[k]) for o in self._obs]) for k in self._obs[0]}

    def _reset(self, seeds: list, mask: np.ndarray | None) -> dict:
        if self.vector:
            if mask is None:
                obs, _ = self.envs.reset(seed=seeds)
            else:
                obs, _ = self.envs.reset(seed=seeds, options={"reset_mask": mask})
        else:
            rows = list(range(self.n)) if mask is None else [int(i) for i in np.nonzero(mask)[0]]
            if self.pooled:
                outs = self.envs.reset_slots(rows, [seeds[i] for i in rows])
            else:
                outs = [self.envs[i].reset(seed=seeds[i]) for i in rows]
            for i, (o, _) in zip(rows, outs):
                self._obs[i] = o
            obs = self._stacked()
        self._env_done[slice(None) if mask is None else mask] = False
        return obs

    # -- the steps of the loop -----------------------------------------------------------------------------
    def reset(self) -> tuple[dict, list]:
        """Start the first episodes in every slot; return the observations and each slot's seed (None: idle)."""
        self._clear()
        seeds = [self._assign(i) for i in range(self.n)]
        obs = self._reset(seeds, None)
        if self.on_frame is not None:
            self.on_frame(self.envs, self.active)
        return obs, seeds

    def step(self, actions: np.ndarray, slots: np.ndarray | None = None) -> SlotStep:
        """One env step: slot ``i`` executes ``actions[i]``. ``slots`` (bool per slot; default: the slots running an
        episode) are the ones that act; with a vector env the others step with the idle action, so they may only
        be slots without an episode, with a list of envs they are not stepped at all."""
        n, active = self.n, self.active
        slots = active.copy() if slots is None else np.asarray(slots, dtype=bool) & active
        rows = np.nonzero(slots)[0]
        if self.vector:
            space = self.envs.single_action_space
            acts = np.repeat(self.idle_action[None], n, axis=0)
            acts[rows] = np.asarray(actions)[rows].astype(space.dtype)
            obs, rew, term, trunc, info = self.envs.step(acts)
            term, trunc = np.asarray(term, dtype=bool), np.asarray(trunc, dtype=bool)
            succ = info_field(info, "is_success", n, False, bool)
            unst = info_field(info, "sim_unstable", n, False, bool)
            modes = info_field(info, "mode", n, -1, np.int64) if "mode" in info else None
            has_mode = np.asarray(info.get("_mode", np.ones(n, dtype=bool)), dtype=bool) if modes is not None else None
            self._env_done = term | trunc
        else:
            rew, term, trunc = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
            succ, unst = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
            modes, has_mode = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
            outs = (self.envs.step_slots(rows, [actions[i] for i in rows]) if self.pooled
                    else [self.envs[i].step(actions[i]) for i in rows])
            for i, (self._obs[i], r, te, tr, inf) in zip(rows, outs):
                rew[i], term[i], trunc[i] = float(r), bool(te), bool(tr)
                succ[i], unst[i] = bool(inf.get("is_success", False)), bool(inf.get("sim_unstable", False))
                if "mode" in inf:
                    modes[i], has_mode[i] = -1 if inf["mode"] is None else int(inf["mode"]), True
            self._env_done[rows] = (term | trunc)[rows]
            obs = self._stacked()
        self.ret[rows] += rew[rows]
        self.length[rows] += 1
        self.success[rows] |= succ[rows]
        self.unstable[rows] |= unst[rows]
        if modes is not None:
            for r in rows:
                if has_mode[r]:
                    self.mode[r] = int(modes[r])
        limit = (self.length >= self.max_steps) if self.max_steps else False
        ended = slots & ((term | trunc) | limit)
        for r in np.nonzero(ended)[0]:
            rec = self.current(r)
            if self.seeds is not None:
                self.records[self.slot_ep[r]] = rec
            if self.on_episode is not None:
                self.on_episode(rec)
        self._ended = ended
        if self.on_frame is not None:
            self.on_frame(self.envs, active)  # before any reset, so the final state of an episode is shown
        return SlotStep(obs, rew, term, trunc, ended, succ)

    def current(self, slot: int) -> EpisodeRecord:
        """The record of the episode running in ``slot``, as it stands."""
        return EpisodeRecord(seed=int(self.slot_seed[slot]), success=bool(self.success[slot]), ret=float(self.ret[slot]),
                             length=int(self.length[slot]), mode=self.mode[slot], unstable=bool(self.unstable[slot]))

    def follow(self, src: int, slots) -> None:
        """``slots`` continue the episode of slot ``src`` from where it stands: its simulator state (a list of envs
        with ``get_state`` / ``set_state``), its current observation and its record so far (return, length,
        success, mode)."""
        if self.vector or self.pooled:
            raise ConfigError("copying an episode's state between slots needs a list of local environments.")
        state = self.envs[src].unwrapped.get_state()
        for m in slots:
            self.envs[m].unwrapped.set_state(state)
            self._obs[m] = {k: np.array(v, copy=True) for k, v in self._obs[src].items()}
            for acc in (self.ret, self.length, self.success, self.unstable):
                acc[m] = acc[src]
            self.mode[m] = self.mode[src]

    def place(self, slots, states) -> dict:
        """The episodes in ``slots`` go on from the simulator states ``states`` (a list of envs with ``get_state`` /
        ``set_state``: a state taken from another episode); returns every slot's current observation."""
        if self.vector or self.pooled:
            raise ConfigError("starting an episode from a stored simulator state needs a list of local environments.")
        for m, state in zip(slots, states):
            env = self.envs[m].unwrapped
            env.set_state(state)
            self._obs[m] = env.observation()
        return self._stacked()

    def restart(self, ended: np.ndarray | None = None) -> tuple[dict, np.ndarray, list] | None:
        """Reset the slots whose episode ended (default: at the last step) with their next episode's seed, and
        the idle slots whose env finished a throwaway episode (or the vector env refuses to step them again).
        Returns ``(observations, the reset slots, each slot's new seed or None)``, or None when nothing was
        reset: no slot needed it, or every episode has run and no other slot is still running one."""
        active = self.active
        ended = self._ended if ended is None else np.asarray(ended, dtype=bool)
        reset = ended | (~active & self._env_done)
        if not reset.any() or (self.seeds is not None and self.next_ep >= len(self.seeds)
                               and not (active & ~ended).any()):
            self.slot_ep[ended] = -1  # nothing left to run: no reset needed
            return None
        seeds = [self._assign(r) if reset[r] and active[r] else None for r in range(self.n)]
        obs = self._reset(seeds, reset)
        self._ended = np.zeros(self.n, dtype=bool)
        if self.on_frame is not None:
            self.on_frame(self.envs, reset & self.active)  # first frame of the newly started episodes
        return obs, reset, seeds

    def run(self, decide: Callable[[dict, np.ndarray], np.ndarray],
            begin: Callable[[dict, np.ndarray, list], None] | None = None,
            observe: Callable[[dict, np.ndarray], None] | None = None) -> list[EpisodeRecord]:
        """Run every episode of the seed list and return their records (in seed order). ``begin(obs, slots,
        seeds)`` is called when ``slots`` (bool per slot) start episodes (``seeds[i]``: slot i's seed, None for
        an idle slot), ``decide(obs, active) -> actions (n, Da)`` before every step (rows of inactive slots are
        ignored), ``observe(obs, active)`` after it, before any reset."""
        if self.seeds is None:
            raise ConfigError("run() plays a list of seeded episodes; this runner's episodes are endless.")
        obs, seeds = self.reset()
        if begin is not None:
            begin(obs, np.ones(self.n, dtype=bool), seeds)
        while self.active.any():
            active = self.active
            res = self.step(decide(obs, active), active)
            obs = res.obs
            if observe is not None:
                observe(obs, active)
            restarted = self.restart()
            if restarted is not None:
                obs, reset, seeds = restarted
                if begin is not None:
                    begin(obs, reset, seeds)
        return self.records  # type: ignore[return-value]


def _noise_generator(device: torch.device, episode_seed: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([episode_seed & 0xFFFFFFFF, _NOISE_SALT]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def run_episodes(policy, venv, seeds: Sequence[int], *, max_steps: int | None = None, steps: int | None = None,
                 per_episode_noise: bool = True, on_episode: Callable[[EpisodeRecord], None] | None = None,
                 on_frame: Callable[[object, np.ndarray], None] | None = None) -> tuple[list[EpisodeRecord], int]:
    """Run ``len(seeds)`` episodes of ``policy`` (anything with ``obs_keys, To, Tp, Ta, action_dim, device`` and
    ``act``); return their records (in seed order) and the number of ``act`` calls.

    ``on_episode(record)`` is called as each episode finishes. ``on_frame(venv, slots)`` is called after
    every step and after every reset, ``slots`` (bool per env) naming the slots whose current state is a
    frame of a real episode; video recording hooks in there.
    """
    n_envs = venv.num_envs
    device = torch.device(policy.device)
    To, Tp, Ta, Da = int(policy.To), int(policy.Tp), int(policy.Ta), int(policy.action_dim)
    if not 1 <= Ta <= Tp:
        raise ShapeError(f"the policy has Ta={Ta}, Tp={Tp}; need 1 <= Ta <= Tp.")
    history = ObsHistory(policy.obs_keys, To, n_envs, device, shapes=getattr(policy, "image_shapes", None))
    queue = np.zeros((n_envs, Ta, Da), dtype=np.float32)
    queue_pos = np.full(n_envs, Ta)  # Ta = queue empty, re-plan before the next step
    gens: list[torch.Generator | None] = [None] * n_envs
    # Fallback stream for noise the policy draws itself: all of it when per_episode_noise is off, and
    # the per-step noise of stochastic samplers (DDPM). Seeded, so runs repeat at a fixed n_envs.
    shared_gen = _noise_generator(device, int(seeds[0]) if len(seeds) else 0)
    calls = 0

    def begin(obs, slots, slot_seeds):
        history.start(history.read(obs)[0], slots)  # a fresh episode's history is its first observation, To times
        for r in np.nonzero(slots)[0]:
            queue_pos[r] = Ta
            if slot_seeds[r] is not None:
                gens[r] = _noise_generator(device, slot_seeds[r]) if per_episode_noise else None

    def decide(obs, active):
        nonlocal calls
        plan = active & (queue_pos >= Ta)
        if plan.any():
            rows = np.nonzero(plan)[0]
            noise = (torch.stack([torch.randn(Tp, Da, device=device, generator=gens[r]) for r in rows])
                     if per_episode_noise else None)
            chunk = policy.act(history.window(rows), noise=noise, steps=steps, generator=shared_gen)
            if tuple(chunk.shape) != (len(rows), Tp, Da):
                raise ShapeError(f"policy.act returned shape {tuple(chunk.shape)}; expected {(len(rows), Tp, Da)} = (B, Tp, Da).")
            # The one host transfer per re-plan: only the part that will be executed.
            queue[rows] = chunk[:, :Ta].detach().to("cpu", torch.float32).numpy()
            queue_pos[rows] = 0
            calls += 1
        rows = np.nonzero(active)[0]
        actions = np.zeros((n_envs, Da), dtype=np.float32)
        actions[rows] = queue[rows, queue_pos[rows]]
        queue_pos[rows] += 1
        return actions

    def observe(obs, active):
        history.push(history.read(obs)[0])  # every slot slides; slots about to reset start over in begin

    runner = EpisodeRunner(venv, seeds, max_steps=max_steps, on_episode=on_episode, on_frame=on_frame)
    records = runner.run(decide, begin, observe)
    return records, calls
