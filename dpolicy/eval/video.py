"""Video of evaluation episodes: replay the first seeded episodes in one rgb_array env and save them.

The batched evaluation never renders; instead the first ``n_episodes`` seeds are replayed here in a
single render-enabled env through the same loop (same seeds, same per-episode noise), so the video
shows the very episodes that were scored, as long as the policy and env are deterministic given
those seeds. Frames of all episodes go into one file, ``.mp4`` (imageio-ffmpeg, H.264) or ``.gif``
by the path's suffix. For a policy that reads cameras, each frame shows the scene with what the
policy saw beside it: its camera images of that step, scaled up to the scene's height (nearest
pixel, so the policy's resolution stays visible). A machine that cannot render (e.g. MuJoCo without an offscreen GL context)
raises ``RenderError`` with one sentence, or, with ``strict=False``, warns and writes nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

from dpolicy.errors import ConfigError, DPolicyError
from dpolicy.eval.runner import policy_inference, run_episodes

VIDEO_SUFFIXES = (".mp4", ".gif")


class RenderError(DPolicyError, RuntimeError):
    """The environment cannot produce rgb frames, or the video file cannot be written."""


def as_rgb_frame(frame) -> np.ndarray:
    """Check and convert one ``render()`` result to an ``(H, W, 3)`` uint8 array."""
    if frame is None:
        raise RenderError("env.render() returned None; build the env with render_mode='rgb_array'.")
    a = np.asarray(frame)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise RenderError(f"env.render() returned an array of shape {a.shape}; expected (H, W, 3) rgb.")
    a = a[..., :3]
    if a.dtype != np.uint8:
        # Float frames are taken as [0, 1] intensities, the usual convention of float renderers.
        a = np.clip(np.asarray(a, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return a


def check_video_writer(path: str | Path) -> None:
    """Raise when ``path`` cannot be written on this machine: a ConfigError for a suffix that is no video format,
    a RenderError naming the fix when its encoder is missing (``.mp4`` needs imageio's ffmpeg plugin, ``.gif``
    only Pillow). Called before the work whose video it is (training, evaluation), so a missing encoder stops a
    run at its start instead of after hours of training."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ConfigError(f"video path {str(path)!r} must end in one of {VIDEO_SUFFIXES}.")
    if path.suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg

            imageio_ffmpeg.get_ffmpeg_exe()
        except Exception as e:  # not installed, or installed without its ffmpeg binary
            raise RenderError(f"writing the video {path.name!r} needs imageio's ffmpeg plugin ({type(e).__name__}: {e}); "
                              f"install it (pip install imageio-ffmpeg) or turn the video off (eval.video=false for "
                              f"dpolicy-train, video=false for dpolicy-eval).") from e


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: float = 30.0) -> Path:
    """Write rgb frames to ``.mp4`` or ``.gif`` (chosen by suffix); returns the path."""
    import imageio.v2 as iio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ConfigError(f"video path {str(path)!r} must end in one of {VIDEO_SUFFIXES}.")
    if not frames:
        raise RenderError("no frames were recorded, so there is no video to write.")
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [as_rgb_frame(f) for f in frames]
    if suffix == ".gif":
        # GIF frame durations are in milliseconds for imageio's pillow plugin; loop=0 repeats forever.
        iio.mimwrite(path, frames, format="GIF", duration=1000.0 / fps, loop=0)
    else:
        # H.264 with yuv420p needs even width and height; pad by edge replication instead of letting
        # the ffmpeg plugin rescale (which blurs small renders).
        h, w = frames[0].shape[:2]
        pad = ((0, h % 2), (0, w % 2), (0, 0))
        with iio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                            pixelformat="yuv420p") as writer:
            for f in frames:
                writer.append_data(np.pad(f, pad, mode="edge"))
    return path


def beside(scene: np.ndarray, views: Sequence[np.ndarray]) -> np.ndarray:
    """``scene`` (H, W, 3) with each of ``views`` (h, w, 3) scaled by an integer factor to at most H rows (nearest
    pixel) and placed to its right, separated by a 2-pixel dark gap, on one canvas."""
    H = scene.shape[0]
    tiles = [scene]
    for v in views:
        v = as_rgb_frame(v)
        f = max(1, H // v.shape[0])
        big = np.repeat(np.repeat(v, f, axis=0), f, axis=1)[:H]
        pad = np.zeros((H, big.shape[1], 3), np.uint8)
        pad[:big.shape[0]] = big
        tiles += [np.full((H, 2, 3), 32, np.uint8), pad]
    return np.concatenate(tiles, axis=1)


def make_render_env(env_fn: Callable, ready: bool = False):
    """Build the video env: ``env_fn()`` if ``ready``, else ``env_fn(render_mode="rgb_array")``."""
    if ready:
        env = env_fn()
    else:
        try:
            env = env_fn(render_mode="rgb_array")
        except TypeError:
            env = env_fn()  # the factory takes no arguments; it may still render rgb arrays
    mode = getattr(env, "render_mode", None)
    if mode != "rgb_array":
        env.close()
        raise RenderError(f"the video env has render_mode={mode!r}; pass video_env_fn building it with render_mode='rgb_array'.")
    return env


def record_video(policy, env_fn: Callable, path: str | Path, n_episodes: int = 1, seed: int = 0,
                 max_steps: int | None = None, steps: int | None = None, per_episode_noise: bool = True,
                 strict: bool = True, env_is_render_ready: bool = False, fps: float | None = None) -> Path | None:
    """Replay episodes ``seed .. seed + n_episodes - 1`` with rendering and save them to ``path``.

    Returns the written path, or None when rendering failed and ``strict`` is False.
    """
    from gymnasium.vector import AutoresetMode

    path = Path(path)
    frames: list[np.ndarray] = []
    cameras = list(getattr(policy, "image_shapes", {}) or {})
    seen: dict = {}  # the observation of the video env's current step (what the policy reads)

    def on_frame(venv, active):
        if active[0]:
            try:
                frame = venv.envs[0].render()
            except Exception as e:  # GL/EGL/OSMesa failures surface as many different types
                raise RenderError(f"env.render() failed ({type(e).__name__}: {e}); this machine may lack an offscreen GL context (try MUJOCO_GL=egl or osmesa).") from e
            frame = as_rgb_frame(frame)
            if cameras and all(k in seen for k in cameras):
                frame = beside(frame, [seen[k] for k in cameras])
            frames.append(frame)

    try:
        check_video_writer(path)  # a missing encoder is a RenderError: raised when strict, else warned about
        try:
            env = make_render_env(env_fn, env_is_render_ready)
        except RenderError:
            raise
        except Exception as e:
            raise RenderError(f"could not create a render-enabled env ({type(e).__name__}: {e}).") from e
        if cameras:
            env = _Seen(env, seen)
        venv = gym.vector.SyncVectorEnv([lambda: env], autoreset_mode=AutoresetMode.DISABLED)
        try:
            with policy_inference(policy):
                run_episodes(policy, venv, [seed + i for i in range(n_episodes)], max_steps=max_steps,
                             steps=steps, per_episode_noise=per_episode_noise, on_frame=on_frame)
        finally:
            venv.close()
        fps = fps or (env.metadata or {}).get("render_fps") or 30
        try:
            return write_video(frames, path, fps=float(fps))
        except (RenderError, ConfigError):
            raise
        except Exception as e:
            raise RenderError(f"could not write video {str(path)!r} ({type(e).__name__}: {e}).") from e
    except RenderError as e:
        if strict:
            raise
        warnings.warn(f"no video written: {e}", RuntimeWarning, stacklevel=2)
        return None



class _Seen(gym.Wrapper):
    """Keeps the latest observation in a dict shared with the video recorder (what the policy reads)."""

    def __init__(self, env, store: dict):
        super().__init__(env)
        self.store = store

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.store.clear()
        self.store.update(obs)
        return obs, info

    def step(self, action):
        out = self.env.step(action)
        self.store.clear()
        self.store.update(out[0])
        return out
