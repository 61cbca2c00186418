"""Noise headroom: can steering the initial noise help a base policy at all?

DSRL only chooses the noise the frozen base denoises. From a start state where the base fails
whatever the noise (or succeeds whatever the noise) there is nothing to steer. ``noise_headroom``
replays each of ``n_states`` seeded start states with ``n_noises`` different noise seeds (the base
sampled as DSRL samples it, deterministic given the noise) and reports, per state, the share of
noises that succeed. The share of *mixed* states (some noises succeed, some fail) is the room DSRL
has; the share of states where at least one noise succeeded bounds what a per-episode choice of
noise seeds reaches (a per-decision actor can do better, so it is a floor on the ceiling, not a cap).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dpolicy.errors import ConfigError


def noise_headroom(policy, env_fn: Callable, n_states: int = 20, n_noises: int = 8, state_seed: int = 500000,
                   max_steps: int | None = None) -> dict:
    """Per-state success over noise seeds for ``policy`` (chunked execution, its own sampler)."""
    from dpolicy.deploy.controller import Controller

    if n_states < 1 or n_noises < 2:
        raise ConfigError(f"noise_headroom needs n_states >= 1 and n_noises >= 2, got {n_states} and {n_noises}.")
    env = env_fn()
    ctrl = Controller(policy, "chunked")
    rate = np.zeros((n_states, n_noises), dtype=bool)
    stride = max(n_states, 1000)  # noise seed n * stride + state: no two pairs share one, however many states
    try:
        for s in range(n_states):
            for n in range(n_noises):
                obs, _ = env.reset(seed=state_seed + s)
                ctrl.reset(seed=n * stride + s)  # a distinct noise stream for every (state, noise) pair
                steps = 0
                while True:
                    obs, _, term, trunc, info = env.step(ctrl.step(obs))
                    steps += 1
                    rate[s, n] |= bool(info.get("is_success", False))
                    if term or trunc or (max_steps and steps >= max_steps):
                        break
    finally:
        env.close()
    per_state = rate.mean(1)
    return {"n_states": n_states, "n_noises": n_noises, "state_seed": state_seed, "per_state": per_state.tolist(),
            "success": float(rate.mean()), "mixed": float(((per_state > 0) & (per_state < 1)).mean()),
            "never": float((per_state == 0).mean()), "always": float((per_state == 1).mean()),
            "best_noise_per_state": float((per_state > 0).mean())}


def _mc_returns(rewards: list[float], gamma: float) -> list[float]:
    out, g = [], 0.0
    for r in reversed(rewards):
        g = r + gamma * g
        out.append(g)
    return out[::-1]


def _fit(x_tr, y_tr, x_va, y_va, hidden: int, iters: int, seed: int):
    """An MLP regressor fit by MSE; returns the net at its best held-out loss and that loss."""
    import copy

    import torch

    from dpolicy.rl.agent import mlp

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = mlp(x_tr.shape[1], 1, hidden, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    best, best_state = float("inf"), None
    for it in range(iters):
        idx = torch.randint(len(y_tr), (256,), generator=g)
        loss = ((net(x_tr[idx]).squeeze(-1) - y_tr[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % 100 == 0:
            with torch.no_grad():
                v = float(((net(x_va).squeeze(-1) - y_va) ** 2).mean())
            if v < best:
                best, best_state = v, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    return net.eval(), best


def chunk_signal(policy, env_fn: Callable, env_steps: int = 50000, n_envs: int = 8, k: int = 16, episodes: int = 60,
                 hidden: int = 256, iters: int = 3000, gamma: float = 0.99, action_magnitude: float = 1.5,
                 seed: int = 0) -> dict:
    """Does a single decision's noise carry value a critic can learn? (DSRL's critics live on this.)

    Runs the base as DSRL runs it (noise ``w ~ N(0, I)`` clipped to the box, one chunk per decision)
    for ``env_steps``, regresses each decision's discounted return on the state alone, V(s), and on
    the state and executed chunk, Q(s, a), and scores both on held-out episodes (20%). If Q explains
    no more than V, the chunk's noise does not decide what follows, whatever the headroom over whole
    episodes. Then it acts with the fitted Q: at every decision the best (and the worst) of ``k``
    noises by Q, against the base's own draw, over ``episodes`` episodes each.
    """
    import torch

    from dpolicy.rl.noise_env import NoiseActionEnv

    if env_steps < 1 or n_envs < 1 or k < 2 or episodes < 1:
        raise ConfigError(f"chunk_signal needs env_steps, n_envs, episodes >= 1 and k >= 2 (got {env_steps}, {n_envs}, {episodes}, {k}).")
    g = torch.Generator(device=policy.device).manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, device=policy.device).clamp(-action_magnitude, action_magnitude)

    env = NoiseActionEnv(policy, env_fn, n_envs, seed)
    open_eps = [[] for _ in range(n_envs)]
    done_eps: list[list] = []
    state, steps = env.reset(), 0
    try:
        while steps < env_steps:
            st = env.step(state, draw(n_envs, env.noise_dim))
            for i in range(n_envs):
                open_eps[i].append((state[i].cpu(), st.executed[i].cpu(), float(st.reward[i])))
                if st.done[i]:
                    done_eps.append(open_eps[i])
                    open_eps[i] = []
            state, steps = st.state, steps + st.env_steps
    finally:
        env.close()
    if len(done_eps) < 5:
        raise ConfigError(f"chunk_signal finished only {len(done_eps)} episodes in {env_steps} env steps; raise env_steps.")

    def flat(eps):
        s = torch.stack([x[0] for e in eps for x in e])
        a = torch.stack([x[1] for e in eps for x in e])
        y = torch.tensor([r for e in eps for r in _mc_returns([x[2] for x in e], gamma)])
        return s, a, y

    perm = np.random.default_rng(seed).permutation(len(done_eps))
    cut = int(0.8 * len(done_eps))
    (s_tr, a_tr, y_tr), (s_va, a_va, y_va) = flat([done_eps[i] for i in perm[:cut]]), flat([done_eps[i] for i in perm[cut:]])
    _, mse_v = _fit(s_tr, y_tr, s_va, y_va, hidden, iters, seed)
    q, mse_q = _fit(torch.cat([s_tr, a_tr], 1), y_tr, torch.cat([s_va, a_va], 1), y_va, hidden, iters, seed)
    q = q.to(policy.device)

    def run(pick: int) -> float:
        """Success over ``episodes`` episodes choosing, per decision, the best (+1), worst (-1) or first (0) of k noises."""
        e = NoiseActionEnv(policy, env_fn, min(10, episodes), seed + 1)
        st_, wins = e.reset(), []
        try:
            while len(wins) < episodes:
                ws = draw(k, e.n, e.noise_dim)
                if pick == 0:
                    w = ws[0]
                else:
                    with torch.no_grad():
                        vals = torch.stack([q(torch.cat([st_, e.executed_part(e.decode(st_, ws[j]))], 1)).squeeze(-1) for j in range(k)])
                    w = ws[(pick * vals).argmax(0), torch.arange(e.n)]
                o = e.step(st_, w)
                st_ = o.state
                wins += o.success[o.done].tolist()
        finally:
            e.close()
        return float(np.mean(wins[:episodes]))

    return {"env_steps": steps, "episodes_collected": len(done_eps), "decisions": int(len(y_tr) + len(y_va)),
            "return_var": float(y_va.var()), "mse_v": mse_v, "mse_q": mse_q,
            "q_gain": (mse_v - mse_q) / max(float(y_va.var()), 1e-12),
            "k": k, "episodes": episodes, "base_success": run(0), "best_of_k_success": run(1), "worst_of_k_success": run(-1)}
