"""The batched receding-horizon loop: run a fixed list of seeded episodes on a vector env.

Each sub-env of the vector env is a slot; episodes (one seed each) are handed to slots as they
free up and their results are stored by episode index, so the outcome does not depend on how
many slots there are. Resets are managed here (the vector env is built with
``AutoresetMode.DISABLED``), which means no hidden autoreset step is ever counted and every
reset gets its episode's seed. Observation histories live on ``policy.device`` as
``(n_envs, To, d_k)`` tensors; only slots whose action queue is empty are re-planned, all of them
in one batched ``policy.act`` call, and the executed part ``chunk[:, :Ta]`` is copied to the host
once per re-plan. Latent noise is drawn per episode from a generator seeded by the episode's seed,
so a stochastic policy also gives the same episodes whatever the batch composition.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from dpolicy.errors import ShapeError

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


def _noise_generator(device: torch.device, episode_seed: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([episode_seed & 0xFFFFFFFF, _NOISE_SALT]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def _obs_to_device(obs: dict, keys: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ShapeError(f"the environment's observations have no key(s) {missing}; it provides {sorted(obs)}.")
    return {k: torch.as_tensor(np.asarray(obs[k], dtype=np.float32)).reshape(len(obs[k]), -1).to(device)
            for k in keys}


def run_episodes(policy, venv, seeds: Sequence[int], *, max_steps: int | None = None, steps: int | None = None,
                 per_episode_noise: bool = True, on_episode: Callable[[EpisodeRecord], None] | None = None,
                 on_frame: Callable[[object, np.ndarray], None] | None = None) -> tuple[list[EpisodeRecord], int]:
    """Run ``len(seeds)`` episodes; return their records (in seed order) and the number of ``act`` calls.

    ``on_episode(record)`` is called as each episode finishes. ``on_frame(venv, slots)`` is called after
    every step and after every reset, ``slots`` (bool per env) naming the slots whose current state is a
    frame of a real episode; video recording hooks in there.
    """
    n_envs, n_eps = venv.num_envs, len(seeds)
    device = torch.device(policy.device)
    To, Tp, Ta, Da = int(policy.To), int(policy.Tp), int(policy.Ta), int(policy.action_dim)
    if not 1 <= Ta <= Tp:
        raise ShapeError(f"the policy has Ta={Ta}, Tp={Tp}; need 1 <= Ta <= Tp.")
    keys = list(policy.obs_keys)
    space = venv.single_action_space
    # Slots without an episode must still be stepped (vector envs step all slots); give them a
    # harmless in-bounds action and ignore what they do.
    idle_action = np.clip(np.zeros(space.shape), space.low, space.high).astype(space.dtype)

    records: list[EpisodeRecord | None] = [None] * n_eps
    slot_ep = np.full(n_envs, -1)  # episode index per slot, -1 = idle
    ret = np.zeros(n_envs)
    length = np.zeros(n_envs, dtype=np.int64)
    success = np.zeros(n_envs, dtype=bool)
    unstable = np.zeros(n_envs, dtype=bool)
    mode: list[int | None] = [None] * n_envs
    queue = np.zeros((n_envs, Ta, Da), dtype=np.float32)
    queue_pos = np.full(n_envs, Ta)  # Ta = queue empty, re-plan before the next step
    gens: list[torch.Generator | None] = [None] * n_envs
    # Fallback stream for noise the policy draws itself: all of it when per_episode_noise is off, and
    # the per-step noise of stochastic samplers (DDPM). Seeded, so runs repeat at a fixed n_envs.
    shared_gen = _noise_generator(device, int(seeds[0]) if n_eps else 0)
    next_ep = 0
    policy_calls = 0
    hist: dict[str, torch.Tensor] = {}

    def start(slot: int) -> int | None:
        """Give ``slot`` the next episode (returns its seed) or mark it idle (returns None)."""
        nonlocal next_ep
        ret[slot], length[slot], success[slot], unstable[slot], mode[slot] = 0.0, 0, False, False, None
        queue_pos[slot] = Ta
        if next_ep >= n_eps:
            slot_ep[slot] = -1
            return None
        slot_ep[slot], next_ep = next_ep, next_ep + 1
        s = int(seeds[slot_ep[slot]])
        gens[slot] = _noise_generator(device, s) if per_episode_noise else None
        return s

    def fill_history(obs: dict, mask: np.ndarray) -> None:
        # A fresh episode's history is its first observation repeated To times.
        new = _obs_to_device(obs, keys, device)
        idx = torch.as_tensor(np.nonzero(mask)[0], device=device)
        for k in keys:
            if k not in hist:
                hist[k] = new[k][:, None].repeat(1, To, 1)
            else:
                hist[k][idx] = new[k][idx, None].expand(-1, To, -1)

    reset_seeds = [start(i) for i in range(n_envs)]
    obs, _ = venv.reset(seed=reset_seeds)
    fill_history(obs, np.ones(n_envs, dtype=bool))
    if on_frame is not None:
        on_frame(venv, slot_ep >= 0)

    while (slot_ep >= 0).any():
        active = slot_ep >= 0
        plan = active & (queue_pos >= Ta)
        if plan.any():
            rows = np.nonzero(plan)[0]
            idx = torch.as_tensor(rows, device=device)
            batch_obs = {k: hist[k][idx] for k in keys}
            noise = (torch.stack([torch.randn(Tp, Da, device=device, generator=gens[r]) for r in rows])
                     if per_episode_noise else None)
            chunk = policy.act(batch_obs, noise=noise, steps=steps, generator=shared_gen)
            if tuple(chunk.shape) != (len(rows), Tp, Da):
                raise ShapeError(f"policy.act returned shape {tuple(chunk.shape)}; expected {(len(rows), Tp, Da)} = (B, Tp, Da).")
            # The one host transfer per re-plan: only the part that will be executed.
            queue[rows] = chunk[:, :Ta].detach().to("cpu", torch.float32).numpy()
            queue_pos[rows] = 0
            policy_calls += 1

        actions = np.repeat(idle_action[None], n_envs, axis=0)
        act_rows = np.nonzero(active)[0]
        actions[act_rows] = queue[act_rows, queue_pos[act_rows]].astype(space.dtype)
        queue_pos[act_rows] += 1

        obs, rew, term, trunc, info = venv.step(actions)
        succ_now = info_field(info, "is_success", n_envs, False, bool)
        unst_now = info_field(info, "sim_unstable", n_envs, False, bool)
        has_mode = "mode" in info
        mode_now = info_field(info, "mode", n_envs, -1, np.int64) if has_mode else None
        mode_mask = np.asarray(info.get("_mode", np.ones(n_envs, dtype=bool)), dtype=bool) if has_mode else None

        ret[act_rows] += rew[act_rows]
        length[act_rows] += 1
        success[act_rows] |= succ_now[act_rows]
        unstable[act_rows] |= unst_now[act_rows]
        if has_mode:
            for r in act_rows:
                if mode_mask[r]:
                    mode[r] = int(mode_now[r])

        # Slide every history by one; slots about to reset are overwritten below.
        new = _obs_to_device(obs, keys, device)
        for k in keys:
            hist[k] = torch.cat([hist[k][:, 1:], new[k][:, None]], dim=1)

        if on_frame is not None:
            on_frame(venv, active)  # before any reset, so the final state of an episode is shown
        env_done = np.asarray(term, dtype=bool) | np.asarray(trunc, dtype=bool)
        ep_done = active & (env_done | ((length >= max_steps) if max_steps else False))
        for r in np.nonzero(ep_done)[0]:
            rec = EpisodeRecord(seed=int(seeds[slot_ep[r]]), success=bool(success[r]), ret=float(ret[r]),
                                length=int(length[r]), mode=mode[r], unstable=bool(unstable[r]))
            records[slot_ep[r]] = rec
            if on_episode is not None:
                on_episode(rec)
        # Idle slots that ended their throwaway episode need a reset too, or the vector env
        # refuses to step them again.
        reset_mask = ep_done | (~active & env_done)
        if reset_mask.any() and (next_ep < n_eps or (active & ~ep_done).any()):
            reset_seeds = [start(r) if reset_mask[r] and active[r] else None for r in range(n_envs)]
            obs, _ = venv.reset(seed=reset_seeds, options={"reset_mask": reset_mask})
            fill_history(obs, reset_mask)
            if on_frame is not None:
                on_frame(venv, reset_mask & (slot_ep >= 0))  # first frame of the newly started episodes
        else:
            slot_ep[ep_done] = -1  # nothing left to run: no reset needed

    return records, policy_calls  # type: ignore[return-value]
