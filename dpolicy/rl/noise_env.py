"""The noise-action MDP: the RL action is the base policy's initial noise ``w``.

``NoiseActionEnv`` runs ``n_envs`` copies of an environment. Its state is the base policy's
normalized observation-history encoding (``policy.encode``), its action a batch ``w`` of shape
``(n, Tp * Da)`` inside ``Box(-b, b)``. One ``step`` makes ONE batched call to the frozen base policy
on its device, executes each chunk's first ``Ta`` actions (stopping early when an episode ends),
sums the rewards, and resets finished environments. Deterministic samplers (DDIM with eta=0, flow
ODEs) make the chunk a function of ``(state, w)``; a stochastic sampler (DDPM) is allowed, as the
ablation, and flagged by ``deterministic = False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpolicy.errors import ConfigError


@dataclass
class NoiseStep:
    next_state: torch.Tensor     # (n, S) state after the chunk (the final state when the episode ended)
    state: torch.Tensor          # (n, S) state for the next decision (a fresh episode's where one ended)
    executed: torch.Tensor       # (n, Ta * Da) normalized actions of the chunk's executed part
    reward: torch.Tensor         # (n,) summed reward over the executed actions
    terminated: torch.Tensor     # (n,) 1.0 where the episode terminated (no bootstrap)
    done: np.ndarray             # (n,) episode ended (terminated or truncated)
    success: np.ndarray          # (n,) success flag of ended episodes
    env_steps: int               # environment steps taken by this call


class NoiseActionEnv:
    def __init__(self, base, env_fn, n_envs: int = 4, seed: int = 0, action_magnitude: float = 1.5,
                 steps: int | None = None, reward_offset: float = 0.0):
        if n_envs < 1:
            raise ConfigError(f"n_envs={n_envs} must be at least 1.")
        if not (action_magnitude > 0 and np.isfinite(action_magnitude)):
            raise ConfigError(f"action_magnitude={action_magnitude} must be a positive finite number.")
        self.base = base.eval().requires_grad_(False)
        self.deterministic = not getattr(base.process, "stochastic", False)
        self.envs = [env_fn() for _ in range(n_envs)]
        self.n, self.b, self.steps, self.reward_offset = n_envs, float(action_magnitude), steps, float(reward_offset)
        self.To, self.Tp, self.Ta, self.Da = base.To, base.Tp, base.Ta, base.action_dim
        self.noise_dim, self.exec_dim = self.Tp * self.Da, self.Ta * self.Da
        self.state_dim = base.cond_dim
        self.device = base.device
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)  # only stochastic samplers use it
        self.hist: list[dict[str, np.ndarray]] = [{} for _ in range(n_envs)]
        self.ep_return = np.zeros(n_envs)
        self.ep_len = np.zeros(n_envs, dtype=int)

    # -- observation history -> state ------------------------------------------------------------
    def _start(self, i: int, obs: dict) -> None:
        self.hist[i] = {k: np.repeat(np.asarray(obs[k], np.float32).reshape(1, -1), self.To, 0) for k in self.base.obs_keys}

    def _push(self, i: int, obs: dict) -> None:
        for k in self.base.obs_keys:
            h = self.hist[i][k]
            h[:-1] = h[1:]
            h[-1] = np.asarray(obs[k], np.float32).reshape(-1)

    def _encode(self, hists: list[dict]) -> torch.Tensor:
        obs = {k: torch.as_tensor(np.stack([h[k] for h in hists]), device=self.device) for k in self.base.obs_keys}
        return self.base.encode(obs)

    def _reset_env(self, i: int) -> None:
        obs, _ = self.envs[i].reset(seed=int(self.rng.integers(2**31)))
        self._start(i, obs)
        self.ep_return[i], self.ep_len[i] = 0.0, 0

    def reset(self) -> torch.Tensor:
        for i in range(self.n):
            self._reset_env(i)
        return self._encode(self.hist)

    # -- the base policy ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, state: torch.Tensor, w: torch.Tensor, generator=None) -> torch.Tensor:
        """Normalized chunks ``(B, Tp, Da)`` the frozen base makes from states and noise (B, Tp*Da)."""
        noise = w.reshape(-1, self.Tp, self.Da)
        return self.base.sample_normalized(state, noise, self.steps, generator)

    def executed_part(self, chunk: torch.Tensor) -> torch.Tensor:
        return chunk[:, :self.Ta].reshape(chunk.shape[0], -1)

    @torch.no_grad()
    def step(self, state: torch.Tensor, w: torch.Tensor) -> NoiseStep:
        if tuple(w.shape) != (self.n, self.noise_dim):
            raise ConfigError(f"noise action has shape {tuple(w.shape)}; expected {(self.n, self.noise_dim)}.")
        w = w.clamp(-self.b, self.b)
        chunk = self.decode(state, w, self.gen)
        actions = self.base.normalizer.action.unnormalize(chunk)[:, :self.Ta].cpu().numpy()
        reward = np.zeros(self.n)
        term, done, success = np.zeros(self.n), np.zeros(self.n, bool), np.zeros(self.n, bool)
        env_steps = 0
        for i, env in enumerate(self.envs):
            for j in range(self.Ta):
                obs, r, terminated, truncated, info = env.step(actions[i, j])
                env_steps += 1
                reward[i] += float(r) + self.reward_offset
                self.ep_len[i] += 1
                self._push(i, obs)
                if terminated or truncated:
                    term[i], done[i] = float(terminated), True
                    success[i] = bool(info.get("is_success", False))
                    break
        self.ep_return += reward
        next_state = self._encode(self.hist)
        for i in np.nonzero(done)[0]:
            self._reset_env(i)
        new_state = self._encode(self.hist) if done.any() else next_state
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        return NoiseStep(next_state, new_state, self.executed_part(chunk), t(reward), t(term), done, success, env_steps)

    def close(self) -> None:
        for env in self.envs:
            env.close()
