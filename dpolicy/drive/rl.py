"""Group RL for trajectory-token planners: GSPO (sequence-level ratio) and GRPO (token-level ratio).

Per scene a group of G trajectories is decoded, scored with the PDMS-like scorer, and advantages
are normalised within the group: the PDMS-like score itself (``advantage="group"``), or each sub-score
(NC, DAC, TTC, comfort, EP) separately, summed, then normalised over the batch (``"decoupled"``,
GDPO), so that different failure combinations with the same PDMS-like score (a collision, a trip off
the road) stop collapsing to the same advantage. Dividing by each group's std turns a near-tied group's
thousandths into advantages as large as a collision's; ``baseline="mean"`` keeps the group's mean and divides by
the batch's std instead (Dr. GRPO), and ``baseline="greedy"`` also replaces the mean with the planner's own
greedy plan for the scene (self-critical, as in SCST): a sample is pushed up only when it beats the plan the
planner would actually drive, which is what the evaluation decodes. ``kl_coef`` adds a KL penalty to the
starting planner (the k3 estimate on the sampled tokens, as GRPO does); 0 by default. Each rollout batch is split into several
mini-batches (and optionally epochs) so that the policy moves away from the one that sampled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from dpolicy.drive.masked import ORDERS
from dpolicy.errors import ConfigError


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(S, G) rewards -> (S, G) advantages (r - mean) / std within each group; 0 for flat groups."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ConfigError(f"group rewards must have shape (S, G) with G >= 2, got {tuple(rewards.shape)}.")
    std = rewards.std(1, unbiased=False, keepdim=True)
    adv = (rewards - rewards.mean(1, keepdim=True)) / std.clamp(min=eps)
    return torch.where(std > eps, adv, torch.zeros_like(adv))


DECOUPLED_KEYS = ("nc", "dac", "ttc", "comfort", "ep")


def decoupled_advantages(subs: dict, keys=DECOUPLED_KEYS, eps: float = 1e-6) -> torch.Tensor:
    """GDPO: sum over ``keys`` of each sub-score's group-normalised advantage ((S, G) each), then normalised
    over the whole batch (mean 0, std 1; 0 everywhere when nothing differs)."""
    total = sum(group_advantages(subs[k], eps) for k in keys)
    std = total.std(unbiased=False)
    return (total - total.mean()) / std if std > eps else torch.zeros_like(total)


def baseline_advantages(rewards: dict, base: dict, keys=("pdms",), eps: float = 1e-6) -> torch.Tensor:
    """Advantages (S, G) against a per-scene baseline: each sample's reward minus its scene's baseline (``base``,
    (S, 1) per key: the greedy plan's scores, or the group's means), divided by the batch's std of that difference;
    the sign, better or worse than the baseline, is kept. With several ``keys`` (decoupled) each key's difference is
    scaled by its own batch std, and their sum by its batch std."""
    def scaled(d):
        std = d.std(unbiased=False)
        return d / std if std > eps else torch.zeros_like(d)

    diffs = [scaled(rewards[k] - base[k]) for k in keys]
    return diffs[0] if len(diffs) == 1 else scaled(sum(diffs))


def gspo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.02,
              eps_high: float = 0.03) -> tuple[torch.Tensor, dict]:
    """GSPO: s_i = exp(mean_t (logp - logp_old)), loss = -mean_i min(s_i A_i, clip(s_i) A_i).

    logp, logp_old (N, L) per-token log-probs (old ones detached), adv (N,).
    """
    s = torch.exp((logp - logp_old.detach()).mean(1))
    loss = -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv).mean()
    clipped = ((s < 1 - eps_low) | (s > 1 + eps_high)).float().mean()
    return loss, {"ratio_dev": float((s.detach() - 1).abs().mean()), "clip_frac": float(clipped)}


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2,
              eps_high: float = 0.28) -> tuple[torch.Tensor, dict]:
    """GRPO: per-token r_t = exp(logp_t - logp_old_t), loss = -mean_i mean_t min(r A, clip(r) A)."""
    r = torch.exp(logp - logp_old.detach())
    a = adv[:, None]
    loss = -torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a).mean(1).mean()
    clipped = ((r < 1 - eps_low) | (r > 1 + eps_high)).float().mean()
    return loss, {"ratio_dev": float((r.detach() - 1).abs().mean()), "clip_frac": float(clipped)}


@dataclass
class RLConfig:
    algo: str = "gspo"            # gspo | grpo
    advantage: str = "group"      # group (PDMS-like normalised per group) | decoupled (GDPO: per sub-score, summed,
                                  # then normalised over the batch)
    baseline: str = "group"       # group (the group's mean and std) | mean (the group's mean, the batch's std: Dr. GRPO) |
                                  # greedy (the scene's greedy plan, the batch's std: self-critical)
    group: int = 8                # G trajectories per scene
    scenes_per_iter: int = 64     # scenes per rollout batch (x group = 512 trajectories, the drive benchmark's recipe)
    iters: int = 50
    minibatches: int = 4          # updates per rollout batch (per epoch)
    epochs: int = 1
    lr: float = 2e-4
    lr_schedule: str = "linear"   # constant | linear (decays to 0 at the last iteration; at a constant lr the greedy
                                  # score rose early and fell back)
    temperature: float = 1.0
    steps: int = 8                # decoding steps for rollouts
    order: str = "confidence"
    estimator: str = "one_step"   # one_step (d1) | elbo (stratified) | replay (the decoding states, MDPO-like)
    eps_low: float | None = None  # None: 0.05/0.08 for GSPO (sequence ratio), 0.2/0.28 for GRPO (token ratio)
    eps_high: float | None = None
    eval_every: int = 10
    seed: int = 0
    kl_coef: float = 0.0          # KL penalty to the starting planner (k3 estimate on the sampled tokens)

    def __post_init__(self):
        if self.algo not in ("gspo", "grpo"):
            raise ConfigError(f"rl.algo {self.algo!r} is unknown; choose gspo or grpo.")
        if self.advantage not in ("group", "decoupled"):
            raise ConfigError(f"rl.advantage {self.advantage!r} is unknown; choose group or decoupled.")
        if self.lr_schedule not in ("constant", "linear"):
            raise ConfigError(f"rl.lr_schedule {self.lr_schedule!r} is unknown; choose constant or linear.")
        if self.baseline not in ("group", "mean", "greedy"):
            raise ConfigError(f"rl.baseline {self.baseline!r} is unknown; choose group, mean or greedy.")
        if self.estimator not in ("one_step", "elbo", "replay"):
            raise ConfigError(f"rl.estimator {self.estimator!r} is unknown; choose one_step, elbo or replay.")
        if self.group < 2:
            raise ConfigError(f"rl.group must be >= 2 for group-normalised advantages, got {self.group}.")
        for k in ("scenes_per_iter", "iters", "minibatches", "epochs", "steps", "eval_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"rl.{k} must be >= 1, got {getattr(self, k)}.")
        if not (isinstance(self.kl_coef, (int, float)) and self.kl_coef >= 0):
            raise ConfigError(f"rl.kl_coef={self.kl_coef!r} must be a number of at least 0.")
        if not self.lr > 0 or not self.temperature >= 0:
            raise ConfigError(f"rl.lr={self.lr} must be positive and rl.temperature={self.temperature} at least 0.")
        for k in ("eps_low", "eps_high"):
            if getattr(self, k) is not None and not 0 < getattr(self, k) < 1:
                raise ConfigError(f"rl.{k}={getattr(self, k)} must lie in (0, 1) (null: the algorithm's default).")
        if self.order not in ORDERS:
            raise ConfigError(f"rl.order={self.order!r} is unknown; choose from {', '.join(ORDERS)}.")


def _logp(planner, obs, tokens, cfg: RLConfig, seed: int, when=None):
    if cfg.estimator == "one_step":
        return planner.logp_one_step(obs, tokens)
    if cfg.estimator == "replay":
        return planner.logp_replay(obs, tokens, when, max(cfg.temperature, 1e-3))
    # the same masks for the old and the new policy: the ratio is then 1 on-policy
    gen = torch.Generator(tokens.device).manual_seed(seed)
    return planner.logp_elbo(obs, tokens, gen=gen)


def rl_train(planner, train, evaluate, cfg: RLConfig, log=print) -> list[dict]:
    """Fine-tune ``planner`` in place. ``train`` is a DriveSet of training scenes; ``evaluate(planner)``
    returns the mean PDMS-like score on held-out scenes. Returns the history (one record per iteration).
    """
    from dpolicy_envs.driving import score

    dev = train.expert.device
    gen = torch.Generator(dev).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(planner.parameters(), lr=cfg.lr, weight_decay=0.0)
    lo = cfg.eps_low if cfg.eps_low is not None else (0.05 if cfg.algo == "gspo" else 0.2)
    hi = cfg.eps_high if cfg.eps_high is not None else (0.08 if cfg.algo == "gspo" else 0.28)
    loss_fn = gspo_loss if cfg.algo == "gspo" else grpo_loss
    ref = copy.deepcopy(planner).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    hist = [{"iter": 0, "samples": 0, "test_pdms": evaluate(planner)}]
    samples = 0
    for it in range(1, cfg.iters + 1):
        if cfg.lr_schedule == "linear":  # this iteration's updates at lr * (1 - (it - 1) / iters)
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * (1 - (it - 1) / cfg.iters)
        idx = torch.randperm(train.n, device=dev, generator=gen)[:cfg.scenes_per_iter]
        sub = train.index(idx)
        planner.eval()
        toks, when = planner.decode(sub.obs, steps=cfg.steps, order=cfg.order, temperature=cfg.temperature, gen=gen,
                                    n=cfg.group, return_steps=True)
        obs = {k: v.repeat_interleave(cfg.group, 0) for k, v in sub.obs.items()}
        traj = planner.tok.decode(toks, obs).reshape(len(idx), cfg.group, -1, 2)
        scores = score(sub.scenes, traj, best_progress=sub.best_progress)           # each (S, G)
        r = scores["pdms"]
        if cfg.baseline == "group":
            adv = group_advantages(r) if cfg.advantage == "group" else decoupled_advantages(scores)
        else:
            keys = ("pdms",) if cfg.advantage == "group" else DECOUPLED_KEYS
            if cfg.baseline == "greedy":  # the plan the evaluation drives, decoded as it decodes (same steps and order)
                with torch.no_grad():
                    g_traj = planner.tok.decode(planner.decode(sub.obs, steps=cfg.steps, order=cfg.order, temperature=0.0), sub.obs)
                base = score(sub.scenes, g_traj[:, None], best_progress=sub.best_progress)          # each (S, 1)
            else:  # the group's mean: a near-tied group keeps near-zero advantages (no per-group std blows them up)
                base = {k: scores[k].mean(1, keepdim=True) for k in keys}
            adv = baseline_advantages(scores, base, keys)
        adv = adv.reshape(-1)
        mseed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=dev))
        with torch.no_grad():
            old = _logp(planner, obs, toks, cfg, mseed, when)
        planner.train()
        stats = []
        n = toks.shape[0]
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, device=dev, generator=gen)
            for mb in perm.chunk(cfg.minibatches):
                o = {k: v[mb] for k, v in obs.items()}
                lp = _logp(planner, o, toks[mb], cfg, mseed, when[mb])
                loss, st = loss_fn(lp, old[mb], adv[mb], lo, hi)
                if ref is not None:
                    with torch.no_grad():
                        ref_lp = _logp(ref, o, toks[mb], cfg, mseed, when[mb])
                    d = ref_lp - lp  # k3: exp(d) - d - 1 >= 0, an unbiased estimate of KL(planner || start)
                    kl = (d.exp() - d - 1).mean()
                    loss = loss + cfg.kl_coef * kl
                    st = {**st, "kl": float(kl.detach())}
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(planner.parameters(), 1.0)
                opt.step()
                stats.append(st)
        samples += n + (len(idx) if cfg.baseline == "greedy" else 0)  # the greedy plans are scored too
        rec = {"iter": it, "samples": samples, "reward": float(r.mean()),
               "ratio_dev": sum(s["ratio_dev"] for s in stats) / len(stats),
               "clip_frac": sum(s["clip_frac"] for s in stats) / len(stats)}
        if cfg.baseline == "greedy":
            rec["greedy_reward"] = float(base["pdms"].mean())
        if ref is not None:
            rec["kl"] = sum(s["kl"] for s in stats) / len(stats)
        if it % cfg.eval_every == 0 or it == cfg.iters:
            rec["test_pdms"] = evaluate(planner)
            log(f"  [{cfg.algo} G={cfg.group} seed={cfg.seed}] iter {it}: rollout {rec['reward']:.3f}, test PDMS-like {rec['test_pdms']}")
        hist.append(rec)
    planner.eval()
    return hist
