"""DSRL agents over the noise space: SAC (``algo="sac"``) and noise aliasing (``algo="na"``).

Both learn a tanh-Gaussian actor ``pi(w | s)`` scaled to ``Box(-b, b)`` with an automatically tuned
entropy temperature. They differ in the critic the actor climbs:

* ``sac``: twin critics ``Q(s, w)`` trained by TD on the noise actions taken.
* ``na``: twin action critics ``Q^A(s, a)`` trained by TD on the *executed* normalized actions (the
  bootstrap action is the base policy's chunk for the actor's next noise), and twin noise critics
  ``Q^W(s, w)`` distilled from ``Q^A(s, base(s, w))`` for ``w ~ N(0, I)``. Noise values the base maps
  to the same chunk alias to the same value, which is what makes it sample efficient.

Networks are MLPs with LayerNorm and Tanh, as in the DSRL reference configs; sizes are config.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpolicy.errors import ConfigError


@dataclass
class DSRLConfig:
    algo: str = "na"               # na | sac
    hidden: int = 256              # MLP width (the reference uses 2048 on GPU)
    layers: int = 3
    lr: float = 3e-4
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    utd: int = 10                  # gradient steps per environment step of the vector env (reference: 20)
    noise_critic_steps: int = 1    # NA: distillation steps of Q^W per update (the reference robomimic configs use 10)
    noise_critic_actor_frac: float = 0.5  # NA: share of the distillation noises drawn from the actor instead of
                                          # N(0, I), so Q^W is also fit where the actor goes (0: the reference)
    target_entropy: float | None = 0.0   # None: -dim(w)
    regularizer: str = "entropy"   # entropy: SAC's bonus -log pi(w|s), tuned to target_entropy (the reference).
                                   # prior: a penalty log pi(w|s) - log N(w; 0, I), i.e. the KL to the base's own
                                   # noise prior, tuned to target_kl: the steered policy starts as the base and
                                   # leaves it only where the critic pays for it
    target_kl: float = 0.3         # prior: the KL per noise dimension (nats) the temperature holds the actor to; a
                                   # tanh-Gaussian on Box(-1.5, 1.5) is at least ~0.17 from N(0, 1) per dimension
    init_alpha: float = 0.01       # sparse rewards of at most 1: a large temperature drowns them (reference: 1.0)
    backup_entropy: bool = False   # add the entropy bonus to the TD target (soft Q, as SB3 and the reference do).
                                   # Off by default: with a success reward that ends the episode, the bonus paid
                                   # for every step not yet ended makes Q prefer failing slowly to succeeding
                                   # (measured on push: Q grew to ~4.6 with returns <= 1 and success fell 0.42 -> 0.06)
    action_magnitude: float = 1.5  # b: the noise action box
    q_bounds: tuple | None = None  # (lo, hi): clip TD targets to the returns the task can pay, e.g. (0, 1) for a
                                   # success reward that ends the episode; an overestimating critic then cannot
                                   # climb past what any episode returns

    def __post_init__(self):
        if self.algo not in ("na", "sac"):
            raise ConfigError(f"dsrl.algo={self.algo!r} is not one of ['na', 'sac'].")
        for name in ("hidden", "layers", "batch_size", "utd", "noise_critic_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"dsrl.{name}={getattr(self, name)} must be at least 1.")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"dsrl.gamma={self.gamma} must lie in [0, 1].")
        if self.regularizer not in ("entropy", "prior"):
            raise ConfigError(f"dsrl.regularizer={self.regularizer!r} is not one of ['entropy', 'prior'].")
        if not self.target_kl > 0:
            raise ConfigError(f"dsrl.target_kl={self.target_kl} must be positive.")
        if not 0 <= self.noise_critic_actor_frac <= 1:
            raise ConfigError(f"dsrl.noise_critic_actor_frac={self.noise_critic_actor_frac} must lie in [0, 1].")
        if self.q_bounds is not None:
            if len(self.q_bounds) != 2 or not float(self.q_bounds[0]) < float(self.q_bounds[1]):
                raise ConfigError(f"dsrl.q_bounds={self.q_bounds!r} must be [lo, hi] with lo < hi.")
            self.q_bounds = (float(self.q_bounds[0]), float(self.q_bounds[1]))
        if not 0 < self.tau <= 1:
            raise ConfigError(f"dsrl.tau={self.tau} must lie in (0, 1].")


def mlp(inp: int, out: int, hidden: int, layers: int) -> nn.Sequential:
    mods, d = [], inp
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.Tanh()]
        d = hidden
    mods.append(nn.Linear(d, out))
    return nn.Sequential(*mods)


class Actor(nn.Module):
    """tanh-Gaussian policy over ``Box(-b, b)^dim``."""

    LOG_STD = (-5.0, 2.0)

    def __init__(self, state_dim: int, dim: int, hidden: int, layers: int, b: float):
        super().__init__()
        self.net = mlp(state_dim, 2 * dim, hidden, layers)
        self.b = b

    def forward(self, s: torch.Tensor, deterministic: bool = False, generator=None, eps: torch.Tensor | None = None):
        """``(w, log pi(w | s))``; ``eps`` (standard normal, ``(B, dim)``) replaces the internal draw."""
        mu, log_std = self.net(s).chunk(2, -1)
        if deterministic:
            return self.b * torch.tanh(mu), None
        log_std = log_std.clamp(*self.LOG_STD)
        std = log_std.exp()
        if eps is None:
            eps = torch.randn(mu.shape, device=mu.device, generator=generator)
        u = mu + std * eps
        w = torch.tanh(u)
        logp = (-0.5 * ((u - mu) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1) - mu.shape[-1] * math.log(self.b)
        return self.b * w, logp


class TwinQ(nn.Module):
    def __init__(self, state_dim: int, act_dim: int, hidden: int, layers: int):
        super().__init__()
        self.q1, self.q2 = mlp(state_dim + act_dim, 1, hidden, layers), mlp(state_dim + act_dim, 1, hidden, layers)

    def forward(self, s, a):
        x = torch.cat([s, a], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class DSRLAgent(nn.Module):
    """Actor, critics, temperature and their optimizers. ``decode(s, w)`` is the frozen base (NA only)."""

    def __init__(self, cfg: DSRLConfig, state_dim: int, noise_dim: int, exec_dim: int, decode=None, device="cpu"):
        super().__init__()
        if cfg.algo == "na" and decode is None:
            raise ConfigError("DSRL-NA needs the base policy's decode(state, noise) -> executed actions.")
        self.cfg, self.noise_dim, self.decode = cfg, noise_dim, decode
        h, n = cfg.hidden, cfg.layers
        self.actor = Actor(state_dim, noise_dim, h, n, cfg.action_magnitude)
        crit_in = exec_dim if cfg.algo == "na" else noise_dim
        self.q = TwinQ(state_dim, crit_in, h, n)
        self.q_targ = copy.deepcopy(self.q).requires_grad_(False)
        self.qw = TwinQ(state_dim, noise_dim, h, n) if cfg.algo == "na" else None
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.init_alpha)))
        self.target_entropy = -float(noise_dim) if cfg.target_entropy is None else float(cfg.target_entropy)
        self.to(device)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr)
        self.opt_q = torch.optim.Adam(self.q.parameters(), lr=cfg.lr)
        self.opt_qw = torch.optim.Adam(self.qw.parameters(), lr=cfg.lr) if self.qw is not None else None
        self.opt_alpha = torch.optim.Adam([self.log_alpha], lr=cfg.lr)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    @torch.no_grad()
    def act(self, s: torch.Tensor, deterministic: bool = False, generator=None) -> torch.Tensor:
        return self.actor(s, deterministic, generator)[0]

    def penalty(self, w: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """Per-sample regularizer the temperature weighs: log pi (entropy) or log pi - log N(w; 0, I) (prior)."""
        if self.cfg.regularizer == "entropy":
            return logp
        return logp + 0.5 * (w * w).sum(-1) + 0.5 * w.shape[-1] * math.log(2 * math.pi)

    # -- updates ----------------------------------------------------------------------------------------
    def critic_loss(self, batch: dict) -> torch.Tensor:
        s, r, s2, term = batch["state"], batch["reward"], batch["next_state"], batch["terminated"]
        with torch.no_grad():
            w2, logp2 = self.actor(s2)
            a2 = self.decode(s2, w2) if self.cfg.algo == "na" else w2
            q1t, q2t = self.q_targ(s2, a2)
            v2 = torch.min(q1t, q2t) - (self.alpha * self.penalty(w2, logp2) if self.cfg.backup_entropy else 0.0)
            y = r + self.cfg.gamma * (1 - term) * v2
            if self.cfg.q_bounds is not None:
                y = y.clamp(*self.cfg.q_bounds)
        a = batch["executed"] if self.cfg.algo == "na" else batch["noise"]
        q1, q2 = self.q(s, a)
        return F.mse_loss(q1, y) + F.mse_loss(q2, y)

    def noise_critic_loss(self, s: torch.Tensor) -> torch.Tensor:
        """NA: regress Q^W(s, w) onto Q^A(s, base(s, w)) for w ~ N(0, I) and, for a share of the batch,
        w ~ pi(. | s): the actor must not climb Q^W where it was never fit (the box's corners lie far
        outside a Gaussian's typical set, and the base decodes them into extreme chunks)."""
        b = self.cfg.action_magnitude
        w = torch.randn(s.shape[0], self.noise_dim, device=s.device).clamp(-b, b)
        n_actor = int(round(self.cfg.noise_critic_actor_frac * s.shape[0]))
        with torch.no_grad():
            if n_actor:
                w[:n_actor] = self.actor(s[:n_actor])[0]
            target = torch.min(*self.q(s, self.decode(s, w)))
        p1, p2 = self.qw(s, w)
        return F.mse_loss(p1, target) + F.mse_loss(p2, target)

    def update(self, batch: dict) -> dict:
        """One gradient step on the critic, (NA) one distillation step on the noise critic, the actor and
        the temperature, then the soft target update."""
        loss_q = self.critic_loss(batch)
        self.opt_q.zero_grad(set_to_none=True)
        loss_q.backward()
        self.opt_q.step()
        out = {"critic_loss": float(loss_q.detach())}
        s = batch["state"]
        if self.qw is not None:
            for _ in range(self.cfg.noise_critic_steps):
                loss_w = self.noise_critic_loss(s)
                self.opt_qw.zero_grad(set_to_none=True)
                loss_w.backward()
                self.opt_qw.step()
            out["noise_critic_loss"] = float(loss_w.detach())
        w, logp = self.actor(s)
        critic = self.qw if self.qw is not None else self.q
        critic.requires_grad_(False)
        q = torch.min(*critic(s, w))
        critic.requires_grad_(True)
        pen = self.penalty(w, logp)
        loss_pi = (self.alpha * pen - q).mean()
        self.opt_actor.zero_grad(set_to_none=True)
        loss_pi.backward()
        self.opt_actor.step()
        # entropy: raise alpha while the entropy -logp is below its target; prior: while the KL is above its target
        excess = (logp.detach() + self.target_entropy) if self.cfg.regularizer == "entropy" else (pen.detach() - self.cfg.target_kl * self.noise_dim)
        loss_alpha = -(self.log_alpha * excess).mean()
        self.opt_alpha.zero_grad(set_to_none=True)
        loss_alpha.backward()
        self.opt_alpha.step()
        with torch.no_grad():
            for p, pt in zip(self.q.parameters(), self.q_targ.parameters()):
                pt.lerp_(p, self.cfg.tau)
        out.update(actor_loss=float(loss_pi.detach()), alpha=float(self.alpha), entropy=float(-logp.detach().mean()),
                   regularizer=float(pen.detach().mean()),
                   q_mean=float(q.detach().mean()), noise_abs=float(w.detach().abs().mean() / self.cfg.action_magnitude))
        return out
