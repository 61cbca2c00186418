"""``ObsHistory``: the last ``To`` observations of ``n`` env slots, the one observation history of dpolicy.

Batched evaluation, the controller and the noise-action MDP all keep their windows here, so a new kind of
observation is handled in one place. Semantics (which every success figure depends on): a slot that
starts an episode holds its first observation ``To`` times; every later observation slides the slot's
window by one (oldest first, newest last).

Storage is one float32 buffer ``(n, To, D)`` on ``device``, the keys' values concatenated along the last
axis in key order (``window`` / ``views`` give them per key). It is updated in place, so its storage never
moves (a CUDA graph may read it). Environment observations come in through ``read``: a dict of ``(n, ...)``
arrays (or ``(d,)`` per key when ``n == 1``), flattened per slot into one float32 row per slot, the key
dimensions checked (or, when not given, taken from the first observation). ``read`` returns that row
buffer, which the caller may transform in place (the controller's fast path normalizes it) before
``push`` / ``start`` write it into the windows; on CUDA it lives in pinned memory and is copied once.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from dpolicy.errors import ShapeError


class ObsHistory:
    def __init__(self, keys: Sequence[str], To: int, n: int, device="cpu", dims: Mapping[str, int] | None = None,
                 who: str = "the policy", shapes: Mapping[str, tuple] | None = None):
        self.keys, self.To, self.n, self.who = list(keys), int(To), int(n), who
        # per-step shapes of keys that are not vectors (camera images (H, W, C)): one slot's image arrives
        # as (H, W, C), a batch as (n, H, W, C); both are flattened into the row
        self.shapes = {k: tuple(int(v) for v in s) for k, s in (shapes or {}).items()}
        self.device = torch.device(device)
        self.dims: dict[str, int] | None = None
        self.buffer: torch.Tensor | None = None
        self._staged = None  # CUDA: the event of the pinned row's last host-to-device copy
        if dims is not None:
            self._allocate({k: int(dims[k]) for k in self.keys})

    def _allocate(self, dims: dict) -> None:
        self.dims = dims
        self.slices, off = {}, 0
        for k in self.keys:
            self.slices[k] = slice(off, off + dims[k])
            off += dims[k]
        self._key_slices = [(k, self.slices[k], dims[k]) for k in self.keys]
        self.buffer = torch.zeros(self.n, self.To, off, device=self.device)
        cuda = self.device.type == "cuda"
        self._host = None if cuda else self.buffer.numpy()  # CPU: the buffer's own memory, written through numpy
        self._stage = torch.zeros(self.n, off, pin_memory=True) if cuda else None
        self.row = self._stage.numpy() if cuda else np.zeros((self.n, off), dtype=np.float32)
        self._staged = torch.cuda.Event() if cuda else None

    # -- observations in ---------------------------------------------------------------------------------
    def read(self, obs: Mapping, check_finite: bool = False) -> tuple[np.ndarray, bool]:
        """Write the observations of every slot into the row buffer ``(n, D)`` float32; return it and whether
        they came batched (``(n, d)`` per key) rather than as one slot's ``(d,)``. Raises ShapeError naming
        the key: a missing key, a wrong shape and, with ``check_finite``, a NaN or infinite value."""
        if not isinstance(obs, Mapping):
            raise ShapeError(f"observations must be a dict keyed by {self.keys}, got {type(obs).__name__}.")
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise ShapeError(f"observation key(s) {missing} are missing; {self.who} needs {self.keys} "
                             f"(the observations have {sorted(obs)}).")
        if self.dims is None:
            self._allocate({k: self._dim_of(k, obs[k]) for k in self.keys})
        if self._staged is not None:  # the pinned row may still be read by the previous asynchronous copy
            self._staged.synchronize()
        row, n, batched = self.row, self.n, False
        for k, sl, d in self._key_slices:
            v = obs[k]
            a = np.asarray(v, dtype=np.float32)
            shape = self.shapes.get(k)
            if shape is not None:
                if a.shape == shape and n == 1:
                    row[0, sl] = a.reshape(d)
                elif a.shape == (n, *shape):
                    batched = True
                    row[:, sl] = a.reshape(n, d)
                else:
                    want = f"{shape} or {(n, *shape)}" if n == 1 else f"{(n, *shape)}"
                    raise ShapeError(f"observation {k!r} has shape {np.shape(v)}; expected {want}.")
            elif a.ndim <= 1 and a.size == d and n == 1:
                row[0, sl] = a.reshape(d)
            elif a.ndim >= 1 and a.shape[0] == n and a.size == n * d and (a.ndim >= 2 or d == 1):
                batched = True
                row[:, sl] = a.reshape(n, d)
            else:
                want = f"({d},) or ({n}, {d})" if n == 1 else f"({n}, {d})"
                raise ShapeError(f"observation {k!r} has shape {np.shape(v)}; expected {want}.")
        if check_finite and not np.isfinite(row).all():
            bad = next(k for k, sl, _ in self._key_slices if not np.isfinite(row[:, sl]).all())
            raise ShapeError(f"observation {bad!r} holds NaN or infinite values.")
        return row, batched

    def _dim_of(self, k: str, v) -> int:
        a = np.asarray(v)
        if k in self.shapes:
            return int(np.prod(self.shapes[k]))
        if self.n == 1 and a.ndim <= 1:
            return max(int(a.size), 1)
        if a.ndim >= 1 and a.shape[0] == self.n:
            return max(int(a.size) // self.n, 1)
        raise ShapeError(f"observation {k!r} has shape {np.shape(v)}; expected ({self.n}, d) for {self.n} slots.")

    def _rows_of(self, rows) -> np.ndarray:
        if rows is None or rows is self.row:
            return self.row
        self.row[...] = rows
        return self.row

    def push(self, rows: np.ndarray | None = None, slots=None, fresh=None) -> None:
        """Add one observation per slot (``rows``, ``(n, D)``; by default the last ``read``). The windows of
        ``slots`` (a bool mask; None: every slot) slide by one and end with their row; the slots in ``fresh``
        (a bool mask) start over instead, their window the row repeated ``To`` times."""
        row = self._rows_of(rows)
        fresh = None if fresh is None or not np.any(fresh) else np.nonzero(np.asarray(fresh, dtype=bool))[0]
        if slots is None:
            idx = None
        else:
            idx = np.nonzero(np.asarray(slots, dtype=bool))[0]
            if len(idx) == self.n:
                idx = None
            elif len(idx) == 0 and fresh is None:
                return
        if self._host is not None:  # CPU: write through numpy
            h = self._host
            if idx is None:
                if self.To > 1:
                    h[:, :-1] = h[:, 1:]  # numpy handles the overlap
                h[:, -1] = row
            elif len(idx):
                if self.To > 1:
                    h[idx, :-1] = h[idx, 1:]
                h[idx, -1] = row[idx]
            if fresh is not None:
                h[fresh] = row[fresh, None]
            return
        # CUDA: one copy of the pinned row, then slide on the device
        x = self._stage.to(self.device, non_blocking=True)
        self._staged.record()
        h = self.buffer
        if idx is None:
            for i in range(self.To - 1):  # slice by slice: no overlapping copies
                h[:, i].copy_(h[:, i + 1])
            h[:, -1].copy_(x)
        elif len(idx):
            t = torch.as_tensor(idx, device=self.device)
            h[t] = torch.cat([h[t, 1:], x[t, None]], dim=1)
        if fresh is not None:
            if len(fresh) == self.n:
                h.copy_(x[:, None].expand(-1, self.To, -1))
            else:
                t = torch.as_tensor(fresh, device=self.device)
                h[t] = x[t, None].expand(-1, self.To, -1)

    def start(self, rows: np.ndarray | None = None, slots=None) -> None:
        """Start the windows of ``slots`` (a bool mask; None: every slot) over from their row; the others stay."""
        fresh = np.ones(self.n, dtype=bool) if slots is None else slots
        self.push(rows, slots=np.zeros(self.n, dtype=bool), fresh=fresh)

    # -- windows out -------------------------------------------------------------------------------------
    def window(self, rows: Sequence[int] | np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """``{key: (len(rows), To, d_key)}`` float32 tensors on ``device`` (copies), for ``rows`` (default: all)."""
        if rows is None:
            return {k: self.buffer[:, :, sl].contiguous() for k, sl in self.slices.items()}
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        return {k: self.buffer[idx, :, sl] for k, sl in self.slices.items()}

    def views(self) -> dict[str, torch.Tensor]:
        """``{key: (n, To, d_key)}`` views of the buffer (no copy; they change with it)."""
        return {k: self.buffer[:, :, sl] for k, sl in self.slices.items()}
