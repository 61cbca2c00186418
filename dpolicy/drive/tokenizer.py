"""Uniform trajectory tokenizer: (B, 8, 2) waypoints <-> (B, 16) tokens (x, y interleaved).

``mode="waypoints"`` quantizes each coordinate; ``mode="deltas"`` quantizes the step from the
previously *reconstructed* waypoint (error feedback), so every reconstructed waypoint stays within
half a bin of the original in both modes as long as it lies in range. x tokens and y tokens use
disjoint id ranges of one vocabulary; ``valid_mask`` says which ids each position may take.

``frame="ego"`` tokenizes the waypoints as they are (x ahead, y left of the ego); ``frame="route"`` first
writes them as station along the route lane and lateral offset from it, relative to the ego's own
(``dpolicy.drive.frenet``), so encoding and decoding then need the scenes' observation (``obs``).
"""

from __future__ import annotations

import math

import torch

from dpolicy.drive.frenet import check_frame, from_frame, to_frame
from dpolicy.errors import ConfigError, ShapeError


class TrajectoryTokenizer:
    def __init__(self, mode: str = "deltas", resolution: float = 0.2, x_range=(-1.0, 13.0), y_range=(-3.0, 3.0),
                 n_waypoints: int = 8, frame: str = "ego"):
        check_frame(frame, "tokenizer")
        if mode not in ("waypoints", "deltas"):
            raise ConfigError(f"tokenizer mode {mode!r} is unknown; choose waypoints or deltas.")
        # ranges are waypoint ranges in "waypoints" mode and per-step (0.5 s) delta ranges in "deltas" mode
        if not resolution > 0:
            raise ConfigError(f"tokenizer resolution must be positive, got {resolution}.")
        for name, r in (("x_range", x_range), ("y_range", y_range)):
            if len(r) != 2 or not r[0] < r[1]:
                raise ConfigError(f"tokenizer {name} must be (low, high) with low < high, got {r}.")
        self.mode, self.res, self.n_waypoints, self.frame = mode, float(resolution), int(n_waypoints), frame
        self.ranges = (tuple(map(float, x_range)), tuple(map(float, y_range)))
        # bins sit at integer multiples of the resolution, so 0 (holding the lane, standing still) is always one;
        # the grid starts at the last multiple at or below low and ends at the first at or above high
        self.lows = tuple(lo if abs(lo / self.res - round(lo / self.res)) < 1e-6 else math.floor(lo / self.res) * self.res
                          for lo, _ in self.ranges)
        self.sizes = tuple(math.ceil((hi - lo) / self.res - 1e-9) + 1 for lo, (_, hi) in zip(self.lows, self.ranges))
        self.offsets = (0, self.sizes[0])
        self.vocab = sum(self.sizes)
        self.mask_id = self.vocab
        self.length = 2 * self.n_waypoints

    def config(self) -> dict:
        out = {"mode": self.mode, "resolution": self.res, "x_range": list(self.ranges[0]), "y_range": list(self.ranges[1]),
               "n_waypoints": self.n_waypoints}
        if self.frame != "ego":  # ego-frame tokenizers keep the config they were saved with
            out["frame"] = self.frame
        return out

    def valid_mask(self, device=None) -> torch.Tensor:
        """(L, V) bool: position 2k takes x ids, 2k+1 takes y ids."""
        m = torch.zeros(self.length, self.vocab, dtype=torch.bool, device=device)
        for c in range(2):
            m[c::2, self.offsets[c]:self.offsets[c] + self.sizes[c]] = True
        return m

    def _q(self, v: torch.Tensor, c: int) -> torch.Tensor:
        return torch.round((v - self.lows[c]) / self.res).clamp(0, self.sizes[c] - 1).long()

    def _dq(self, q: torch.Tensor, c: int) -> torch.Tensor:
        return self.lows[c] + q.float() * self.res

    def encode(self, traj: torch.Tensor, obs: dict | None = None) -> torch.Tensor:
        if traj.dim() != 3 or traj.shape[1:] != (self.n_waypoints, 2):
            raise ShapeError(f"trajectories must have shape (B, {self.n_waypoints}, 2), got {tuple(traj.shape)}.")
        if not torch.isfinite(traj).all():
            raise ShapeError("trajectories to encode contain NaN or infinite values.")
        traj = to_frame(self.frame, obs, traj)
        toks = torch.empty(traj.shape[0], self.n_waypoints, 2, dtype=torch.long, device=traj.device)
        if self.mode == "waypoints":
            for c in range(2):
                toks[..., c] = self._q(traj[..., c], c)
        else:  # deltas from the reconstructed previous point; the delta range is centred on 0
            prev = torch.zeros_like(traj[:, 0])
            for k in range(self.n_waypoints):
                for c in range(2):
                    q = self._q(traj[:, k, c] - prev[:, c], c)
                    toks[:, k, c] = q
                    prev[:, c] = prev[:, c] + self._dq(q, c)
        toks = toks + torch.tensor(self.offsets, device=traj.device)
        return toks.reshape(traj.shape[0], self.length)

    def decode(self, tokens: torch.Tensor, obs: dict | None = None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise ShapeError(f"tokens must have shape (B, {self.length}), got {tuple(tokens.shape)}.")
        t = tokens.reshape(-1, self.n_waypoints, 2) - torch.tensor(self.offsets, device=tokens.device)
        if (t < 0).any() or (t[..., 0] >= self.sizes[0]).any() or (t[..., 1] >= self.sizes[1]).any():
            raise ShapeError("tokens hold ids outside their coordinate's range (a mask token left undecoded?).")
        out = torch.stack([self._dq(t[..., c], c) for c in range(2)], -1)
        return from_frame(self.frame, obs, out.cumsum(1) if self.mode == "deltas" else out)
