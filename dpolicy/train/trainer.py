"""The behaviour-cloning trainer: one loop that owns optimisation, EMA, logging and checkpoints.

Everything stateful (weights, EMA and its step, optimizer, LR schedule, every RNG stream, the
data order and position, the history, the best evaluation so far and the early-stop count) goes
through ``_state()`` / ``_load_state()``, so an interrupted run resumes bitwise identically on CPU.

With evaluations during training (``eval_fn`` every ``eval_every`` steps), the trainer tracks the
best success rate (ties keep the earlier step), optionally keeps that step's EMA policy as
``checkpoints/best`` (``keep_best``), stops once ``early_stop`` evaluations in a row reach
``stop_success``, and notes the first evaluation reaching ``TIME_TO_SUCCESS`` (steps and seconds). A step whose loss or gradient norm is not
finite is skipped and counted; ``max_bad_steps`` in a row dump the batch and stop the run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dpolicy.config import TrainConfig
from dpolicy.data.windows import WindowDataset
from dpolicy.errors import CheckpointError, ConfigError, TrainingError
from dpolicy.policy.checkpoint import atomic_dir, check_resume_compatible, complete_steps, newest_step, write_policy_files
from dpolicy.train import distributed as dist_utils
from dpolicy.train.ema import EMA

logger = logging.getLogger("dpolicy.train")

TIME_TO_SUCCESS = 0.9  # the success rate whose first evaluation ``time_to_success`` records


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


class Trainer:
    def __init__(self, policy, data: WindowDataset, cfg: TrainConfig, out_dir, eval_fn=None, eval_every: int = 0):
        self.policy, self.data, self.cfg = policy, data, cfg
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.device = data.device
        self.rank, self.world_size = dist_utils.world()
        self.main = self.rank == 0
        self.eval_fn, self.eval_every = eval_fn, eval_every
        if (cfg.keep_best or cfg.early_stop) and not (eval_fn is not None and eval_every):
            raise ConfigError("train.keep_best and train.early_stop choose steps by the evaluations during training, "
                              "and this run has none; set eval.every to a number of steps.")
        policy.to(self.device).train()
        self.ema = EMA(policy, cfg.ema_power, cfg.ema_max)
        self.opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine_with_warmup(cfg.warmup_steps, cfg.steps))
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + self.rank)
        cuda = self.device.type == "cuda"
        self.amp = cfg.amp and cuda
        model = DDP(policy, device_ids=[self.device.index] if cuda else None) if self.world_size > 1 else policy
        # compile the wrapper, keep the raw policy for EMA and saving: no prefixes leak into weights
        self.model = torch.compile(model, dynamic=False) if cfg.compile else model  # one batch shape: a static graph
        self.step = 0
        self.bad_steps = 0
        self.bad_in_a_row = 0
        self.history: list[dict] = []
        self._writer = None
        # model selection: the best evaluation so far, the early-stop count, the first evaluation >= TIME_TO_SUCCESS
        self.best_step: int | None = None
        self.best_success: float | None = None
        self.success_streak = 0
        self.stopped_early_at: int | None = None
        self.time_to_success: dict | None = None
        self.seconds = 0.0  # wall seconds spent in fit(), evaluations included, summed over resumes
        self.eval_seconds = 0.0  # the part of it spent in evaluations during training

    def selection(self) -> dict:
        """The model-selection record (JSON-ready) a run reports in metrics.json."""
        return {"best_step": self.best_step, "best_success": self.best_success, "success_streak": self.success_streak,
                "stopped_early_at": self.stopped_early_at, "time_to_success": self.time_to_success,
                "seconds": self.seconds, "eval_seconds": self.eval_seconds}

    def _load_selection(self, d: dict) -> None:
        self.best_step, self.best_success = d["best_step"], d["best_success"]
        self.success_streak, self.stopped_early_at = int(d["success_streak"]), d["stopped_early_at"]
        self.time_to_success = d["time_to_success"]
        self.seconds, self.eval_seconds = float(d["seconds"]), float(d["eval_seconds"])

    # -- state --------------------------------------------------------------------------------
    def _state(self) -> dict:
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "train_gen": self.gen.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "model": self.policy.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng,
                "data": self.data.state_dict(), "history": self.history, "bad_steps": self.bad_steps,
                "bad_in_a_row": self.bad_in_a_row, "world_size": self.world_size, "selection": self.selection()}

    def _load_state(self, s: dict) -> None:
        self.step = int(s["step"])
        self.policy.load_state_dict(s["model"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        random.setstate(s["rng"]["python"])
        np.random.set_state(s["rng"]["numpy"])
        torch.set_rng_state(s["rng"]["torch"])
        self.gen.set_state(s["rng"]["train_gen"])
        if "cuda" in s["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng"]["cuda"])
        self.data.load_state_dict(s["data"])
        self.history = list(s["history"])
        self.bad_steps, self.bad_in_a_row = int(s["bad_steps"]), int(s["bad_in_a_row"])
        if "selection" in s:  # checkpoints written before model selection existed start without one
            self._load_selection(s["selection"])

    def save_checkpoint(self) -> Path | None:
        """Atomically write ``step_XXXXXXX`` (EMA policy + training state), then move ``latest``."""
        if not self.main:
            return None
        final = self.ckpt_dir / f"step_{self.step:07d}"
        with atomic_dir(final) as tmp:
            (tmp / "model").mkdir()
            write_policy_files(self.ema.model, tmp / "model")
            (tmp / "training_state").mkdir()
            torch.save(self._state(), tmp / "training_state" / "state.pt")
        pointer_tmp = self.ckpt_dir / ".latest.tmp"
        pointer_tmp.write_text(final.name + "\n")
        if (self.ckpt_dir / "latest").is_dir() and not (self.ckpt_dir / "latest").is_symlink():
            shutil.rmtree(self.ckpt_dir / "latest")  # not a pointer: make room for one
        pointer_tmp.replace(self.ckpt_dir / "latest")
        for old in complete_steps(self.ckpt_dir)[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def save_best(self) -> Path | None:
        """Atomically write ``checkpoints/best`` (the EMA policy now, plus ``best.json``: step and success)."""
        if not self.main:
            return None
        final = self.ckpt_dir / "best"
        with atomic_dir(final) as tmp:
            (tmp / "model").mkdir()
            write_policy_files(self.ema.model, tmp / "model")
            (tmp / "best.json").write_text(json.dumps({"step": self.step, "success_rate": self.best_success}, indent=2))
        return final

    def _after_eval(self, success) -> None:
        """Update the model-selection state with the success rate of the evaluation at this step."""
        if not isinstance(success, (int, float)) or not math.isfinite(success):
            return
        success = float(success)
        if self.best_success is None or success > self.best_success:  # a tie keeps the earlier step
            self.best_step, self.best_success = self.step, success
            if self.cfg.keep_best:
                self.save_best()
        if self.time_to_success is None and success >= TIME_TO_SUCCESS:
            self.time_to_success = {"success_rate": TIME_TO_SUCCESS, "step": self.step, "seconds": self.seconds,
                                    "seconds_without_eval": self.seconds - self.eval_seconds}
        self.success_streak = self.success_streak + 1 if success >= self.cfg.stop_success else 0
        if self.cfg.early_stop and self.success_streak >= self.cfg.early_stop:
            self.stopped_early_at = self.step
            if self.main:
                logger.info("step %d: %d evaluations in a row reached success %.3g; stopping early",
                            self.step, self.success_streak, self.cfg.stop_success)

    def _sync_selection(self) -> None:
        """Under DDP only rank 0 evaluates: every rank takes its selection state (and so stops at the same step)."""
        if self.world_size > 1:
            import torch.distributed as dist

            box = [self.selection()]
            dist.broadcast_object_list(box, src=0)
            self._load_selection(box[0])

    def try_resume(self) -> bool:
        """Load the newest complete checkpoint under ``out_dir/checkpoints``; False if there is none.

        ``latest`` is followed when it names a complete step; whatever else it holds, the newest complete
        step is used. A checkpoint of another network, process or shape is refused, naming the difference."""
        if not self.ckpt_dir.exists():
            return False
        step_dir = newest_step(self.ckpt_dir)
        if step_dir is None:
            return False
        check_resume_compatible(step_dir, self.policy.cfg)
        path = step_dir / "training_state" / "state.pt"
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise CheckpointError(f"{path} cannot be loaded for resume ({type(e).__name__}: {e}).") from None
        if state.get("world_size", 1) != self.world_size:
            raise CheckpointError(f"{path} was written with world_size={state.get('world_size')}; resume with the same number of processes ({self.world_size} now).")
        self._load_state(state)
        return True

    # -- loop ---------------------------------------------------------------------------------
    def _train_step(self) -> tuple[float, float, bool]:
        obs, actions = self.data.sample(self.cfg.batch_size)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.model(obs, actions, self.gen)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # train.compile: no working compiler, or inductor failed
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ConfigError(f"train.compile=true could not compile the training step on this machine ({first}); "
                              "install a C++ compiler or set train.compile=false.") from None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # always: under DDP every rank must join the all-reduce, NaN or not
        gnorm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        ok = bool(torch.isfinite(gnorm)) and bool(torch.isfinite(loss))
        if ok:
            self.opt.step()
            self.ema.update(self.policy)
            self.bad_in_a_row = 0
        else:
            self.opt.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                dump = self.out_dir / "bad_batch.pt"
                torch.save({"obs": obs, "actions": actions, "step": self.step}, dump)
                raise TrainingError(f"{self.bad_in_a_row} non-finite losses in a row at step {self.step}; the last batch is in {dump}.")
        self.sched.step()
        self.step += 1
        return float(loss.detach()), float(gnorm), ok

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if not self.main:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tb"))
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._writer.add_scalar(f"train/{k}" if not k.startswith("eval") else k.replace("eval_", "eval/"), v, rec["step"])
        self._writer.flush()

    def fit(self, resume: bool = True, stop_at: int | None = None) -> list[dict]:
        """Train to ``cfg.steps`` (or stop early at ``stop_at``, which simulates an interruption)."""
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.try_resume()
        end = min(self.cfg.steps, stop_at) if stop_at is not None else self.cfg.steps
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not (self.cfg.progress and self.main),
                   desc="train", dynamic_ncols=True, leave=False)
        losses, t0, n0 = [], time.perf_counter(), self.step
        t_fit, seconds0 = time.perf_counter(), self.seconds
        while self.step < end and self.stopped_early_at is None:
            loss, gnorm, ok = self._train_step()
            self.seconds = seconds0 + time.perf_counter() - t_fit
            if ok:
                losses.append(loss)
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                dt = time.perf_counter() - t0
                rec = {"step": self.step, "loss": float(np.mean(losses)) if losses else float("nan"), "grad_norm": gnorm,
                       "lr": self.sched.get_last_lr()[0], "samples_per_s": (self.step - n0) * self.cfg.batch_size * self.world_size / max(dt, 1e-9),
                       "bad_steps": self.bad_steps}
                if self.eval_fn is not None and self.eval_every and self.step % self.eval_every == 0:
                    if self.main:
                        t_eval = time.perf_counter()
                        rec.update({f"eval_{k}": v for k, v in self.eval_fn(self.ema.model, self.step).items()})
                        self.seconds = seconds0 + time.perf_counter() - t_fit
                        self.eval_seconds += time.perf_counter() - t_eval
                        self._after_eval(rec.get("eval_success_rate"))
                    self._sync_selection()
                self._log(rec)
                if self.main and (self.step % (10 * self.cfg.log_every) == 0 or len(rec) > 6 or self.step == self.cfg.steps):
                    logger.info("step %d/%d  %s", self.step, self.cfg.steps, "  ".join(
                        f"{k}={v:.4g}" for k, v in rec.items() if k not in ("step", "bad_steps") and isinstance(v, float)))
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                losses, t0, n0 = [], time.perf_counter(), self.step
            if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps or self.stopped_early_at is not None:
                self.save_checkpoint()
                dist_utils.barrier()
        bar.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.main:
            (self.out_dir / "train_history.json").write_text(json.dumps(self.history, indent=1))
        return self.history
