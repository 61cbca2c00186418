"""Training throughput: our loop vs a loop in the style of Chi et al.'s Diffusion Policy code.

The reference keeps the windows on the host, builds each sample in a ``Dataset.__getitem__``,
collates with a PyTorch ``DataLoader`` (shuffle, ``num_workers=1`` as in their low-dim configs),
copies every batch to the device, and trains in fp32 without compile. Ours gathers batches on
the device from resident tensors (and uses bf16 autocast / compile on CUDA). Both use the same
network, batch size, optimizer and EMA; the timings alternate in one process and report medians.

For policies that read cameras the reference is the image pipeline of Diffusion Policy and robomimic:
every frame is stored compressed, decoded and converted to float32 per sample on the host
(``ImageHostWindows``), collated by the DataLoader and copied to the device, where the same policy's
encoder takes the random crop (as their ``CropRandomizer`` does, inside the model). Frames are stored
either as zlib streams (robomimic's HDF5 files, gzip-chunked one frame per chunk) or as JPEG 2000
codestreams at a 50 dB quality target (Diffusion Policy's replay buffer for robomimic image datasets,
``Jpeg2k(level=50)`` one frame per chunk). Ours keeps the uint8 frames on the device and crops them
inside the encoder's forward. With ``compile`` the image comparison compiles both loops' training step
(``torch.compile``, inductor on a CPU): the same network is then faster in both, and what is left of
the reference's time is its input pipeline.
"""

from __future__ import annotations

import io
import statistics
import time
import zlib

import numpy as np
import torch

from dpolicy.bench.report import torch_threads
from dpolicy.config import TrainConfig
from dpolicy.data.robomimic import GZIP_LEVEL, Demo
from dpolicy.data.windows import WindowDataset
from dpolicy.train.ema import EMA
from dpolicy.train.trainer import Trainer

# the observations of robomimic's lift_image: two RGB cameras and the robot's proprioception (key -> dimension)
CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")
PROPRIO = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


class HostWindows(torch.utils.data.Dataset):
    """Per-sample window construction on the host, as a replay-buffer sequence sampler does."""

    def __init__(self, data: WindowDataset):
        self.obs = {k: v.cpu().numpy() for k, v in data.obs.items()}
        self.actions = data.actions.cpu().numpy()
        self.start, self.end = data.ep_start.cpu().numpy(), data.ep_end.cpu().numpy()
        self.To, self.Tp = data.To, data.Tp

    def __len__(self):
        return len(self.actions)

    def window(self, i):
        """Step indices of the observation history and of the action chunk at step ``i``."""
        oi = np.maximum(np.arange(i - self.To + 1, i + 1), self.start[i])
        ai = np.minimum(np.arange(i, i + self.Tp), self.end[i])
        return oi, ai

    def __getitem__(self, i):
        oi, ai = self.window(i)
        return {"obs": {k: torch.from_numpy(v[oi]) for k, v in self.obs.items()}, "action": torch.from_numpy(self.actions[ai])}


# Diffusion Policy stores robomimic camera frames with ``Jpeg2k(level=50)``: OpenJPEG at a fixed quality of 50 dB PSNR
JPEG2K_PSNR = 50
CODECS = ("zlib", "jpeg2k")


class ZlibFrames:
    """Frames as zlib streams at ``level`` (the codec and level of ``write_dataset``'s one-frame gzip chunks)."""

    def __init__(self, level: int = GZIP_LEVEL):
        self.level = int(level)
        self.description = f"its own zlib stream at level {self.level} (the codec and level of `write_dataset`'s one-frame gzip chunks)"

    def encode(self, frame: np.ndarray) -> bytes:
        return zlib.compress(frame.tobytes(), self.level)

    def decode(self, blob: bytes, shape) -> np.ndarray:
        return np.frombuffer(zlib.decompress(blob), np.uint8).reshape(shape)


class Jpeg2kFrames:
    """Frames as JPEG 2000 codestreams at a fixed quality of ``psnr`` dB, as Diffusion Policy stores robomimic images;
    decoded with imagecodecs (the library Diffusion Policy uses) when it is installed, else with Pillow's OpenJPEG."""

    def __init__(self, psnr: float = JPEG2K_PSNR):
        self.psnr = float(psnr)
        try:
            import imagecodecs  # noqa: F401
            self.backend = "imagecodecs"
        except ImportError:
            self.backend = "Pillow"
        self.description = (f"its own JPEG 2000 codestream at a {self.psnr:g} dB quality target (Diffusion Policy's "
                            f"`Jpeg2k(level={self.psnr:g})` for robomimic image datasets; OpenJPEG through {self.backend})")

    def encode(self, frame: np.ndarray) -> bytes:
        if self.backend == "imagecodecs":
            import imagecodecs

            return bytes(imagecodecs.jpeg2k_encode(frame, level=self.psnr))
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame).save(
            out, format="JPEG2000", quality_mode="dB", quality_layers=[self.psnr], no_jp2=True)
        return out.getvalue()

    def decode(self, blob: bytes, shape) -> np.ndarray:
        if self.backend == "imagecodecs":
            import imagecodecs

            return np.asarray(imagecodecs.jpeg2k_decode(blob)).reshape(shape)
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(blob))).reshape(shape)


def frame_codec(name: str):
    """The reference's frame store by name (``CODECS``)."""
    if name == "zlib":
        return ZlibFrames()
    if name == "jpeg2k":
        return Jpeg2kFrames()
    raise ValueError(f"unknown frame codec {name!r}; choose one of {', '.join(CODECS)}.")


class ImageHostWindows(HostWindows):
    """Image windows built per sample on the host, as Diffusion Policy's and robomimic's datasets build them.

    Every camera frame is held compressed on its own (``codec``: zlib streams as in robomimic's HDF5 files, or
    JPEG 2000 as in Diffusion Policy's replay buffer), read from memory, so no file-system or HDF5 cost is added
    to the reference. ``__getitem__`` decodes the window's frames and converts them to float32, giving
    ``(To, H, W, C)`` per camera: the layout the image encoder reads, so no transpose is needed. The values stay
    on the 0..255 scale the encoder divides itself (Diffusion Policy divides by 255 here instead: one pass either
    way), and the random crop is left to the encoder on the device, where Diffusion Policy and robomimic take it.
    """

    def __init__(self, data: WindowDataset, codec: str = "zlib"):
        super().__init__(data)
        self.shapes = dict(data.image_shapes)
        for k in self.shapes:
            del self.obs[k]
        self.codec = frame_codec(codec)
        self.frames = {k: [self.codec.encode(np.ascontiguousarray(f)) for f in data.obs[k].cpu().numpy()] for k in self.shapes}

    @property
    def compressed_bytes_per_frame(self) -> float:
        """Mean bytes one step's frames take compressed, all cameras."""
        return sum(sum(map(len, f)) for f in self.frames.values()) / len(self)

    def __getitem__(self, i):
        oi, ai = self.window(i)
        obs = {k: torch.from_numpy(v[oi]) for k, v in self.obs.items()}
        for k, shape in self.shapes.items():
            obs[k] = torch.from_numpy(np.stack([self.codec.decode(self.frames[k][j], shape) for j in oi]).astype(np.float32))
        return {"obs": obs, "action": torch.from_numpy(self.actions[ai])}


def to_device(batch: dict, device) -> tuple[dict, torch.Tensor]:
    """A collated batch on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch["obs"].items()}, batch["action"].to(device, non_blocking=True)


def _forever(loader):
    while True:
        yield from loader


def _loader_loop(policy, dataset, batch_size: int, steps: int, device, persistent: bool = False,
                 workers: int = 1, compile: bool = False) -> tuple[float, float]:
    """``(samples/s, share of the time spent waiting for the loader)`` over ``steps`` batches after the warm-up
    batches (one; four with ``compile``, whose first calls compile the loss). On a GPU the loss runs under the same
    bf16 autocast as ``Trainer``'s, so both loops train in one precision."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=persistent, drop_last=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)
    ema = EMA(policy)
    policy.train()
    loss_fn = torch.compile(policy.loss, dynamic=False) if compile else policy.loss  # as Trainer compiles
    warm = 4 if compile else 1
    batches = _forever(loader)
    wait, t0 = 0.0, None
    for n in range(steps + warm):
        t = time.perf_counter()
        batch = next(batches)
        if n >= warm:
            wait += time.perf_counter() - t
        obs, act = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(obs, act)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(policy)
        if n == warm - 1:
            _sync(device)
            t0 = time.perf_counter()
    _sync(device)
    total = time.perf_counter() - t0
    batches.close()
    return steps * batch_size / total, wait / total


def reference_loop(policy, data: WindowDataset, batch_size: int, steps: int, device) -> float:
    """Samples/s of the reference loop (after one warm-up batch)."""
    return _loader_loop(policy, HostWindows(data), batch_size, steps, device)[0]


def image_reference_loop(policy, windows: ImageHostWindows, batch_size: int, steps: int, device,
                         workers: int = 1, compile: bool = False) -> tuple[float, float]:
    """``(samples/s, loader-wait share)`` of the image reference loop. Its workers persist across epochs, so no
    worker restart is timed."""
    return _loader_loop(policy, windows, batch_size, steps, device, persistent=True, workers=workers, compile=compile)


def our_loop(policy, data: WindowDataset, batch_size: int, steps: int, device, compile: bool = False) -> float:
    cfg = TrainConfig(steps=10**9, batch_size=batch_size, lr=1e-4, progress=False, compile=compile, log_every=10**9,
                      ckpt_every=10**9)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(policy, data, cfg, d)
        tr._train_step()  # warm-up (and compile)
        for _ in range(3 if compile else 0):
            tr._train_step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            tr._train_step()
        _sync(device)
        return steps * batch_size / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(make_policy, data: WindowDataset, batch_size: int, steps: int, repeats: int = 3, compile: bool = False) -> dict:
    """Alternate the two loops ``repeats`` times on fresh copies of the same policy; medians and ratio."""
    ours, ref = [], []
    for _ in range(repeats):
        ref.append(reference_loop(make_policy().to(data.device), data, batch_size, steps, data.device))
        ours.append(our_loop(make_policy().to(data.device), data, batch_size, steps, data.device, compile))
    mo, mr = statistics.median(ours), statistics.median(ref)
    return {"ours_samples_per_s": mo, "reference_samples_per_s": mr, "ratio": mo / mr, "ours_all": ours, "reference_all": ref}


def host_batch_rate(windows: HostWindows, batch_size: int, samples: int = 1024, seed: int = 0) -> float:
    """Samples/s at which this process builds and collates random batches of ``windows``: the most a reference loop
    with one loader worker can train at (the worker also pays for handing each batch over)."""
    rng = np.random.default_rng(seed)
    batches = max(samples // batch_size, 2)
    t0 = time.perf_counter()
    for _ in range(batches):
        torch.utils.data.default_collate([windows[int(i)] for i in rng.integers(0, len(windows), batch_size)])
    return batches * batch_size / (time.perf_counter() - t0)


def synthetic_image_demos(n_demos: int = 50, length: int = 100, size: int = 84, cameras=CAMERAS, action_dim: int = 7,
                          seed: int = 0) -> list[Demo]:
    """Demos shaped like lift_image's (``size`` x ``size`` RGB ``cameras``, ``PROPRIO`` vectors, 7-D actions) for throughput.

    A frame is a smooth colour ramp, a block moving across it and a sparse one-level dither, so it compresses
    (about 2.4x at level 4) where uniform noise would be stored raw and decode at copy speed, flattering a
    reference that decodes per sample."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    demos = []
    for _ in range(n_demos):
        obs = {k: rng.normal(size=(length, d)).astype(np.float32) for k, d in PROPRIO.items()}
        for cam in cameras:
            ramp = np.stack([xx // 2, yy // 2, (xx + yy) // 4], -1) + rng.integers(20, 120, 3)
            frames = (ramp + (rng.random((length, size, size, 3)) < 0.1)).astype(np.uint8)
            side = size // 4
            path = np.linspace(rng.integers(0, size - side, 2), rng.integers(0, size - side, 2), length).astype(int)
            colour = rng.integers(0, 256, 3, dtype=np.uint8)
            for t, (r, c) in enumerate(path):
                frames[t, r:r + side, c:c + side] = colour
            obs[cam] = frames
        demos.append(Demo(obs=obs, actions=rng.uniform(-1, 1, (length, action_dim)).astype(np.float32)))
    return demos


def image_memory(data: WindowDataset) -> dict:
    """Bytes the camera frames of ``data`` take on its device (uint8) and would take as float32."""
    resident = sum(data.obs[k].numel() * data.obs[k].element_size() for k in data.image_shapes)
    return {"bytes_per_frame": data.image_bytes_per_frame, "resident_uint8": resident,
            "as_float32": sum(data.obs[k].numel() * 4 for k in data.image_shapes)}


def compare_images(make_policy, data: WindowDataset, batch_size: int, steps: int, repeats: int = 3, compile: bool = False,
                   windows: ImageHostWindows | None = None, threads: int | None = None,
                   reference_threads: tuple[int | None, ...] = (None,), workers: int = 1) -> dict:
    """``compare`` for a policy that reads cameras: the reference reads ``windows`` (compressed frames decoded per
    sample on the host; built here when None), ours the uint8 frames resident on the device; both train a fresh
    copy of the same policy, whose encoder crops on the device. Medians, ratio and the reference's
    median share of time spent waiting for its loader. ``threads`` sets torch's compute threads for our loop and
    each of ``reference_threads`` for one timing of the reference's training process (its loader worker is a
    process of its own); the ratio is against the fastest of them (None: leave the setting as it is). ``workers``:
    the reference's loader processes. ``compile`` compiles the training step of both loops."""
    windows = ImageHostWindows(data) if windows is None else windows
    ours, ref, wait = [], {n: [] for n in reference_threads}, {n: [] for n in reference_threads}
    for _ in range(repeats):
        for n in reference_threads:
            with torch_threads(n):
                sps, share = image_reference_loop(make_policy().to(data.device), windows, batch_size, steps,
                                                  data.device, workers, compile)
            ref[n].append(sps)
            wait[n].append(share)
        with torch_threads(threads):
            ours.append(our_loop(make_policy().to(data.device), data, batch_size, steps, data.device, compile))
    per = {n: statistics.median(v) for n, v in ref.items()}
    best = max(per, key=per.get)
    mo, mr = statistics.median(ours), per[best]
    return {"ours_samples_per_s": mo, "reference_samples_per_s": mr, "ratio": mo / mr,
            "reference_wait_share": statistics.median(wait[best]), "reference_threads": best,
            "reference_by_threads": per, "ours_all": ours, "reference_all": ref[best], "reference_wait_all": wait[best]}

