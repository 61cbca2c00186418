"""The noise-action MDP: the RL action is the base policy's initial noise ``w``.

``NoiseActionEnv`` runs ``n_envs`` copies of an environment. Its state is the base policy's
normalized observation-history encoding (``policy.encode``), its action a batch ``w`` of shape
``(n, Tp * Da)`` inside ``Box(-b, b)``. One ``step`` makes ONE batched call to the frozen base policy
on its device, executes each chunk's first ``Ta`` actions (stopping early when an episode ends),
sums the rewards, and resets finished environments. The environments run in dpolicy's episode loop
(``dpolicy.eval.runner.EpisodeRunner`` over the list of envs, endless episodes seeded from ``seed``)
and the observation history is an ``ObsHistory``, as in evaluation. Deterministic samplers (DDIM with eta=0, flow
ODEs) make the chunk a function of ``(state, w)``; a stochastic sampler (DDPM) is allowed, as the
ablation, and flagged by ``deterministic = False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpolicy.errors import ConfigError
from dpolicy.eval.runner import EpisodeRunner
from dpolicy.policy.history import ObsHistory


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
                 steps: int | None = None, reward_offset: float = 0.0, backend=None):
        if n_envs < 1:
            raise ConfigError(f"n_envs={n_envs} must be at least 1.")
        if not (action_magnitude > 0 and np.isfinite(action_magnitude)):
            raise ConfigError(f"action_magnitude={action_magnitude} must be a positive finite number.")
        self.base = base.eval().requires_grad_(False)
        self.deterministic = not getattr(base.process, "stochastic", False)
        from dpolicy.eval.backends import PooledEnvs, RolloutBackend

        backend = RolloutBackend.of(backend)
        # the envs live here (a list) or in worker processes / Ray actors; the base policy stays on its device
        self.envs = [env_fn() for _ in range(n_envs)] if backend.kind == "local" else PooledEnvs(env_fn, n_envs, backend)
        self.n, self.b, self.reward_offset = n_envs, float(action_magnitude), float(reward_offset)
        self.steps = None if steps is None else base.resolve_steps(steps)
        self.To, self.Tp, self.Ta, self.Da = base.To, base.Tp, base.Ta, base.action_dim
        self.noise_dim, self.exec_dim = self.Tp * self.Da, self.Ta * self.Da
        self.state_dim = base.cond_dim
        self.device = base.device
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)  # only stochastic samplers use it
        self.runner = EpisodeRunner(self.envs, next_seed=lambda: int(self.rng.integers(2**31)))
        self.history = ObsHistory(base.obs_keys, self.To, n_envs, self.device, base.obs_dims, shapes=base.image_shapes)
        self.ep_return = np.zeros(n_envs)  # the running episodes' returns, reward_offset included

    @property
    def ep_len(self) -> np.ndarray:
        return self.runner.length

    def _state(self) -> torch.Tensor:
        """The base's encoding of every slot's observation history."""
        return self.base.encode(self.history.window())

    def reset(self) -> torch.Tensor:
        obs, _ = self.runner.reset()
        self.history.start(self.history.read(obs)[0])
        self.ep_return[:] = 0.0
        return self._state()

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
        running = np.ones(self.n, bool)  # slots still executing their chunk
        env_steps = 0
        for j in range(self.Ta):
            res = self.runner.step(actions[:, j], running)
            env_steps += int(running.sum())
            reward[running] += res.reward[running] + self.reward_offset
            self.history.push(self.history.read(res.obs)[0], slots=running)
            ended = res.ended
            term[ended], done[ended], success[ended] = res.terminated[ended], True, res.success[ended]
            running &= ~ended
            if not running.any():
                break
        self.ep_return += reward
        next_state = self._state()
        if done.any():
            obs, reset, _ = self.runner.restart(done)
            self.history.start(self.history.read(obs)[0], reset)
            self.ep_return[reset] = 0.0
        new_state = self._state() if done.any() else next_state
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        return NoiseStep(next_state, new_state, self.executed_part(chunk), t(reward), t(term), done, success, env_steps)

    def close(self) -> None:
        if isinstance(self.envs, list):
            for env in self.envs:
                env.close()
        else:
            self.envs.close()
