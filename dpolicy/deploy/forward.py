"""Latency compensation with a learned forward model: plan from where the robot will be, not where it was.

An inference that starts at control step ``t0`` reads the observation of ``t0`` but its chunk takes over at
``t0 + d``; meanwhile the robot executes ``d`` actions of the current chunk that are already known (committed).
``ForwardModel`` is a one-step model of the policy's vector observations, ``o_{t+1} - o_t = f(o_t, a_t)``,
fitted on demonstrations (the same kind of data the policy was trained on; no simulator state is used). The
asynchronous executor rolls the observation window forward through the committed actions and plans the new
chunk for ``t0 + d`` from the predicted window (``AsyncChunker(..., predictor=...)``), so a policy that needs
fresh observations (push's velocity-servoed pusher) is not fed a stale one. Policies that read cameras are not
supported: there is no image to predict.

Saved as a directory (``model.safetensors`` + ``forward.json``), written atomically like a policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dpolicy.errors import CheckpointError, ConfigError

FORMAT = "dpolicy-forward-model"


class ForwardModel(nn.Module):
    """``(o_t, a_t) -> o_{t+1}`` over the concatenated vector observation keys (in ``keys`` order), as a residual
    MLP on standardized inputs and deltas."""

    def __init__(self, keys: Sequence[str], dims: dict, action_dim: int, hidden: int = 256):
        super().__init__()
        self.keys, self.dims, self.action_dim, self.hidden = list(keys), {k: int(dims[k]) for k in keys}, int(action_dim), int(hidden)
        D = sum(self.dims.values())
        self.net = nn.Sequential(nn.Linear(D + action_dim, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(),
                                 nn.Linear(hidden, D))
        for name, n in (("x_mean", D + action_dim), ("x_std", D + action_dim), ("y_mean", D), ("y_std", D)):
            self.register_buffer(name, torch.zeros(n) if "mean" in name else torch.ones(n))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = (torch.cat([obs, action], -1) - self.x_mean) / self.x_std
        return obs + self.net(x) * self.y_std + self.y_mean

    @torch.no_grad()
    def roll(self, window: dict, committed: torch.Tensor) -> dict:
        """The observation window ``{k: (B, To, d_k)}`` after the ``committed`` actions ``(B, d, Da)`` (env units):
        the last ``To`` frames of the observed history followed by the ``d`` predicted ones."""
        To = next(iter(window.values())).shape[1]
        hist = torch.cat([window[k].to(self.x_mean) for k in self.keys], -1)
        o = hist[:, -1]
        frames = []
        for j in range(committed.shape[1]):
            o = self(o, committed[:, j].to(o))
            frames.append(o)
        hist = torch.cat([hist, *[f[:, None] for f in frames]], 1)[:, -To:]
        out, c = {}, 0
        for k in self.keys:
            out[k] = hist[..., c:c + self.dims[k]].to(window[k].device)
            c += self.dims[k]
        return out

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        from dpolicy.policy.checkpoint import atomic_dir

        with atomic_dir(Path(path)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp / "model.safetensors"))
            (tmp / "forward.json").write_text(json.dumps({"format": FORMAT, "keys": self.keys, "dims": self.dims,
                                                          "action_dim": self.action_dim, "hidden": self.hidden}, indent=1))
        return Path(path)

    @classmethod
    def load(cls, path) -> "ForwardModel":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta_file = path / "forward.json"
        try:
            meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{meta_file} is missing; {path} is not a forward model directory.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_file} is not valid JSON ({e}); the forward model is corrupt.") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_file} is not a dpolicy forward model (format {meta.get('format') if isinstance(meta, dict) else None!r}).")
        model = cls(meta["keys"], meta["dims"], meta["action_dim"], meta.get("hidden", 256))
        try:
            model.load_state_dict(load_file(str(path / "model.safetensors")))
        except (FileNotFoundError, SafetensorError, RuntimeError) as e:
            raise CheckpointError(f"{path / 'model.safetensors'} cannot be loaded ({str(e).splitlines()[0]}).") from None
        return model.eval()

    def check_policy(self, policy) -> None:
        """Refuse a policy whose observations this model does not predict."""
        if getattr(policy, "image_shapes", None):
            raise ConfigError("observation prediction needs a policy without cameras: there is no image to predict.")
        missing = [k for k in policy.obs_keys if k not in self.keys]
        wrong = [k for k in policy.obs_keys if k in self.dims and self.dims[k] != policy.obs_dims[k]]
        if missing or wrong or self.action_dim != policy.action_dim:
            raise ConfigError(f"the forward model predicts {self.keys} ({self.dims}, actions {self.action_dim}) but the "
                              f"policy reads {policy.obs_keys} ({policy.obs_dims}, actions {policy.action_dim}).")


def fit_forward_model(demos, keys: Sequence[str], steps: int = 20_000, batch_size: int = 256, lr: float = 1e-3,
                      hidden: int = 256, seed: int = 0, log=None) -> tuple[ForwardModel, dict]:
    """Fit ``ForwardModel`` on the transitions of ``demos`` (``Demo`` objects with ``obs[k]`` (T, d_k) and
    ``actions`` (T, Da)); a tenth of the transitions are held out. Returns the model and
    ``{"transitions", "val_rmse", "val_delta_std"}`` (per observation dimension)."""
    keys = list(keys)
    if not demos:
        raise ConfigError("fitting a forward model needs at least one demonstration.")
    missing = [k for k in keys if k not in demos[0].obs]
    if missing:
        raise ConfigError(f"the demonstrations have no observation key(s) {missing} to fit a forward model on.")
    X, Y = [], []
    for d in demos:
        o = np.concatenate([np.asarray(d.obs[k], np.float32).reshape(len(d.actions), -1) for k in keys], 1)
        X.append(np.concatenate([o[:-1], np.asarray(d.actions[:-1], np.float32)], 1))
        Y.append(o[1:] - o[:-1])
    X = torch.as_tensor(np.concatenate(X))
    Y = torch.as_tensor(np.concatenate(Y))
    if len(X) < 10:
        raise ConfigError(f"{len(X)} transitions are too few to fit a forward model.")
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise ConfigError("the demonstrations hold NaN or infinite observations or actions.")
    dims = {k: int(np.asarray(demos[0].obs[k]).reshape(len(demos[0].actions), -1).shape[1]) for k in keys}
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ForwardModel(keys, dims, X.shape[1] - sum(dims.values()), hidden)
    perm = torch.randperm(len(X), generator=g)
    val, train = perm[: max(len(X) // 10, 1)], perm[max(len(X) // 10, 1):]
    model.x_mean.copy_(X[train].mean(0))
    model.x_std.copy_(X[train].std(0) + 1e-6)
    model.y_mean.copy_(Y[train].mean(0))
    model.y_std.copy_(Y[train].std(0) + 1e-6)
    opt = torch.optim.Adam(model.net.parameters(), lr=lr)
    for i in range(steps):
        idx = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        pred = model.net((X[idx] - model.x_mean) / model.x_std)
        loss = ((pred - (Y[idx] - model.y_mean) / model.y_std) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (i + 1) % 1000 == 0:
            log(f"forward model: step {i + 1}/{steps}, loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        err = (model(X[val][:, : Y.shape[1]], X[val][:, Y.shape[1]:]) - (X[val][:, : Y.shape[1]] + Y[val]))
    stats = {"transitions": len(X), "val_rmse": err.pow(2).mean(0).sqrt().tolist(),
             "val_delta_std": Y[val].std(0).tolist()}
    return model, stats


def record_rollouts(policy, env_fn, n_episodes: int, seed: int = 0, **controller_kwargs) -> list:
    """``n_episodes`` episodes of ``policy`` itself (synchronous ``Controller``, chunked execution by default) as
    ``Demo`` objects of its observation keys and executed actions: transitions from the states the policy visits,
    which a forward model used beside that policy has to predict (scripted demonstrations visit others). Recorded
    by the demonstration collector's episode loop, with the controller in the expert's place."""
    from dpolicy.data.collect import _episode
    from dpolicy.data.robomimic import Demo
    from dpolicy.deploy.controller import Controller

    if n_episodes < 1:
        raise ConfigError(f"n_episodes={n_episodes} must be at least 1.")
    ctrl = Controller(policy, **{"mode": "chunked", **controller_kwargs})
    keys = list(policy.obs_keys)

    class PolicyExpert:  # the collector's expert interface: reset(obs, info), then an action per observation
        episode_seed = seed

        def reset(self, obs, info):
            ctrl.reset(seed=self.episode_seed)

        def __call__(self, obs):
            return ctrl.step({k: obs[k] for k in keys})

    expert, env, demos = PolicyExpert(), env_fn(), []
    try:
        for ep in range(n_episodes):
            expert.episode_seed = seed + ep
            demo = _episode(env, expert, seed + ep)[0]
            demos.append(Demo(obs={k: demo.obs[k].astype(np.float32) for k in keys},
                              actions=demo.actions.astype(np.float32)))
    finally:
        env.close()
    return demos


def fitting_demos(path, policy, env_fn, rollouts: int = 0, seed: int = 600000) -> list:
    """What a forward model beside ``policy`` is fitted on: the demonstration file ``path`` read for the policy's
    observation keys, and, when ``rollouts``, that many of the policy's own episodes (``record_rollouts``, seeds
    ``seed``..) played in ``env_fn()``'s environments."""
    from dpolicy.data.robomimic import read_dataset

    demos = read_dataset(path, policy.obs_keys)
    return demos + record_rollouts(policy, env_fn, rollouts, seed=seed) if rollouts else demos
