"""Trainer reliability: learning, exact resume, the non-finite guard, atomic checkpoints under
kill -9, and the same loss sequence for the same seed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import make_demos, tiny_policy
from dpolicy.config import TrainConfig
from dpolicy.data import WindowDataset
from dpolicy.errors import ConfigError, TrainingError
from dpolicy.policy import ChunkPolicy, load_checkpoint, resolve_checkpoint
from dpolicy.train import Trainer


def make_trainer(out, steps=40, seed=0, ckpt_every=10, eval_fn=None, eval_every=0, **kw):
    torch.manual_seed(seed)
    pol = tiny_policy(seed=seed)
    data = WindowDataset(make_demos(), pol.obs_keys, pol.To, pol.Tp, seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=16, log_every=5, ckpt_every=ckpt_every, warmup_steps=5, progress=False, seed=seed, **kw)
    return Trainer(pol, data, cfg, out, eval_fn=eval_fn, eval_every=eval_every)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_and_resumed_is_bitwise_identical(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.fit()
    part = make_trainer(tmp_path / "part")
    part.fit(stop_at=20)  # "interrupted" after the step-20 checkpoint
    resumed = make_trainer(tmp_path / "part")  # a fresh process would build exactly this
    assert resumed.try_resume() and resumed.step == 20
    resumed.fit()
    assert state_equal(full.policy.state_dict(), resumed.policy.state_dict())
    assert state_equal(full.ema.model.state_dict(), resumed.ema.model.state_dict())
    assert full.ema.step == resumed.ema.step
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert full.opt.state_dict()["state"][0]["step"] == resumed.opt.state_dict()["state"][0]["step"]


def test_an_unsaved_piece_of_state_breaks_exact_resume(tmp_path):
    """Guards the guard: resuming without the data position must NOT match the uninterrupted run."""
    full = make_trainer(tmp_path / "full")
    full.fit()
    part = make_trainer(tmp_path / "part")
    part.fit(stop_at=20)
    resumed = make_trainer(tmp_path / "part")
    resumed.try_resume()
    resumed.data.load_state_dict(make_trainer(tmp_path / "x").data.state_dict())  # forget the data position
    resumed.fit(resume=False)
    assert not state_equal(full.policy.state_dict(), resumed.policy.state_dict())


def test_same_seed_same_losses_different_seed_different(tmp_path):
    a = [h["loss"] for h in make_trainer(tmp_path / "a", steps=20).fit()]
    b = [h["loss"] for h in make_trainer(tmp_path / "b", steps=20).fit()]
    c = [h["loss"] for h in make_trainer(tmp_path / "c", steps=20, seed=1).fit()]
    assert a == b and a != c


def test_loss_decreases(tmp_path):
    tr = make_trainer(tmp_path, steps=300, ckpt_every=1000)
    hist = tr.fit()
    assert sum(h["loss"] for h in hist[-3:]) / 3 < 0.7 * hist[0]["loss"]


def test_non_finite_steps_are_skipped_counted_and_then_stop(tmp_path):
    tr = make_trainer(tmp_path, steps=30, max_bad_steps=3)
    real = tr.policy.loss
    calls = {"n": 0}

    def flaky(obs, actions, generator=None):
        calls["n"] += 1
        loss = real(obs, actions, generator)
        return loss * float("nan") if calls["n"] in (3, 4) else loss
    tr.policy.loss = flaky
    tr.fit(stop_at=2)
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    tr.fit(stop_at=4)  # steps 3 and 4 are NaN: weights untouched
    assert tr.bad_steps == 2 and state_equal(before, tr.policy.state_dict())
    tr.fit(stop_at=6)
    assert not state_equal(before, tr.policy.state_dict())
    tr.policy.loss = lambda obs, actions, generator=None: real(obs, actions, generator) * float("inf")
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        tr.fit()
    assert (tmp_path / "bad_batch.pt").exists()


def test_checkpoint_failure_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, steps=20, ckpt_every=10)
    tr.fit(stop_at=10)
    good = resolve_checkpoint(tmp_path / "checkpoints")
    import dpolicy.train.trainer as trainer_mod

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(trainer_mod.torch, "save", boom)
    with pytest.raises(OSError):
        tr.fit()
    assert resolve_checkpoint(tmp_path / "checkpoints") == good
    assert not list((tmp_path / "checkpoints").glob(".step_*"))  # no temp debris
    ChunkPolicy.from_checkpoint(tmp_path / "checkpoints")


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_trainer import make_trainer
    tr = make_trainer({out!r}, steps=100000, ckpt_every=1)
    tr.fit()
""")


def _latest_step(ckpts: Path) -> int:
    try:
        return int((ckpts / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    ckpts = out / "checkpoints"
    delays = [0.0, 0.05, 0.11, 0.23, 0.4]  # after this run's first new checkpoint: kills land mid-write or mid-step
    last_step = -1
    for d in delays:
        before = _latest_step(ckpts)
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # a loaded machine starts python slowly; wait for real progress
        while _latest_step(ckpts) <= before and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(d)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = resolve_checkpoint(ckpts)
        ChunkPolicy.from_checkpoint(path)  # loadable, whatever moment the kill hit
        step = int(path.parent.name.split("_")[1])
        assert step > last_step  # each restart resumed and made progress instead of starting over
        last_step = step
    assert last_step > 0


def _garbage_latest(ckpts: Path, kind: str) -> None:
    latest = ckpts / "latest"
    latest.unlink()
    if kind == "random_bytes":
        latest.write_bytes(bytes(range(256)) * 3)
    elif kind == "not_utf8":
        latest.write_bytes(b"step_\xff\xfe0000010\n")
    elif kind == "missing_step":
        latest.write_text("step_0999999\n")
    elif kind == "incomplete_step":
        (ckpts / "step_0000090" / "model").mkdir(parents=True)  # a crash mid-write, no COMPLETE marker
        latest.write_text("step_0000090\n")
    elif kind == "path_outside":
        latest.write_text("../../etc\n")
    elif kind == "absolute_path":
        latest.write_text(str(ckpts / "step_0000010") + "\n")
    elif kind == "empty":
        latest.write_text("")
    elif kind == "directory":
        latest.mkdir()


@pytest.mark.parametrize("kind", ["random_bytes", "not_utf8", "missing_step", "incomplete_step", "path_outside",
                                  "absolute_path", "empty", "directory"])
def test_a_garbage_latest_pointer_falls_back_to_the_newest_complete_step(tmp_path, kind):
    from dpolicy.policy import load_policy

    tr = make_trainer(tmp_path, steps=40, ckpt_every=10, keep_checkpoints=3)
    tr.fit(stop_at=20)
    ckpts = tmp_path / "checkpoints"
    _garbage_latest(ckpts, kind)
    assert resolve_checkpoint(ckpts) == ckpts / "step_0000020" / "model"
    assert resolve_checkpoint(tmp_path) == ckpts / "step_0000020" / "model"
    load_policy(ckpts)
    resumed = make_trainer(tmp_path, steps=40, ckpt_every=10, keep_checkpoints=3)
    assert resumed.try_resume() and resumed.step == 20
    resumed.fit()  # and training goes on, writing a proper pointer again
    assert (ckpts / "latest").read_text().strip() == "step_0000040"


def test_a_valid_latest_pointer_is_followed_and_step_numbers_sort_numerically(tmp_path):
    tr = make_trainer(tmp_path, steps=20, ckpt_every=10, keep_checkpoints=3)
    tr.fit()
    ckpts = tmp_path / "checkpoints"
    (ckpts / "latest").write_text("step_0000010\n")
    assert resolve_checkpoint(ckpts) == ckpts / "step_0000010" / "model"
    assert resolve_checkpoint(ckpts / "latest") == ckpts / "step_0000010" / "model"
    import shutil

    shutil.copytree(ckpts / "step_0000020", ckpts / "step_100000000")  # past 7 digits: still the newest
    (ckpts / "latest").unlink()
    assert resolve_checkpoint(ckpts) == ckpts / "step_100000000" / "model"


def _trainer_with(out, **policy_kw):
    from conftest import tiny_policy_cfg

    cfg = tiny_policy_cfg(**{k: v for k, v in policy_kw.items() if k in ("net", "process", "sampler", "To", "Tp", "Ta")})
    keys = policy_kw.get("obs_keys", ["pos", "vel"])
    data = WindowDataset(make_demos(), keys, cfg.To, cfg.Tp)
    cfg = type(cfg)(**{**cfg.__dict__, "obs_keys": keys, "obs_dims": data.obs_dims})
    torch.manual_seed(0)
    pol = ChunkPolicy(cfg, data.fit_normalizer())
    tcfg = TrainConfig(steps=20, batch_size=16, log_every=5, ckpt_every=10, warmup_steps=5, progress=False)
    return Trainer(pol, data, tcfg, out)


@pytest.mark.parametrize("other,match", [
    (dict(process="flow", sampler="euler"), "step_0000010 was trained with process.type='diffusion', process.sampler='ddim'; "
                                            "this run asks for process.type='flow', process.sampler='euler' — use a new hydra.run.dir"),
    (dict(net="unet"), "was trained with net.type='mlp'; this run asks for 'unet' — use a new hydra.run.dir or the same settings"),
    (dict(Tp=12), "Tp=8; this run asks for 12"),
    (dict(obs_keys=["pos"]), "obs_dims={'pos': 2, 'vel': 3}, obs_keys=['pos', 'vel']; this run asks for obs_dims={'pos': 2}, obs_keys=['pos']"),
])
def test_resuming_with_another_network_process_or_shape_is_refused_naming_the_difference(tmp_path, other, match):
    from dpolicy.errors import CheckpointError

    _trainer_with(tmp_path).fit(stop_at=10)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    other_run = _trainer_with(tmp_path, **other)
    with pytest.raises(CheckpointError, match=re.escape(match)):
        other_run.fit()
    assert other_run.step == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing written, nothing lost
    assert _trainer_with(tmp_path).try_resume()  # the same settings still resume


SCRIPTED_SUCCESS = {5: 0.2, 10: 0.9, 15: 0.85, 20: 1.0, 25: 0.95, 30: 1.0, 35: 1.0, 40: 1.0}


def selecting_trainer(out, steps=40, **kw):
    """A trainer whose evaluations during training report SCRIPTED_SUCCESS (and record when they ran)."""
    evaluated = []

    def fake_eval(model, step):
        evaluated.append(step)
        return {"success_rate": SCRIPTED_SUCCESS[step]}
    tr = make_trainer(out, steps=steps, ckpt_every=10, eval_fn=fake_eval, eval_every=5, **kw)
    tr.evaluated = evaluated
    return tr


def test_best_checkpoint_is_the_highest_evaluation_and_ties_keep_the_earlier_step(tmp_path):
    from dpolicy.policy import load_policy

    tr = selecting_trainer(tmp_path / "run", keep_best=True)
    tr.fit()
    assert tr.best_step == 20 and tr.best_success == 1.0 and tr.stopped_early_at is None and tr.step == 40
    assert tr.time_to_success["step"] == 10 and tr.time_to_success["success_rate"] == 0.9
    assert 0 < tr.time_to_success["seconds_without_eval"] <= tr.time_to_success["seconds"] <= tr.seconds
    best = tmp_path / "run" / "checkpoints" / "best"
    assert json.loads((best / "best.json").read_text()) == {"step": 20, "success_rate": 1.0}
    assert resolve_checkpoint(best) == best / "model"
    at20 = make_trainer(tmp_path / "ref", steps=40, ckpt_every=10)
    at20.fit(stop_at=20)
    assert state_equal(load_policy(best).state_dict(), at20.ema.model.state_dict())
    assert [h.get("eval_success_rate") for h in tr.history if "eval_success_rate" in h] == list(SCRIPTED_SUCCESS.values())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_0000030", "step_0000040"]


def test_early_stop_after_n_evaluations_at_the_threshold_and_resume_is_exact(tmp_path):
    full = selecting_trainer(tmp_path / "full", keep_best=True, early_stop=2)
    full.fit()
    assert full.stopped_early_at == 35 and full.step == 35 and full.evaluated[-1] == 35  # 30 and 35 reached 1.0
    assert full.best_step == 20
    ckpts = tmp_path / "full" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000035"  # the stop step is saved

    part = selecting_trainer(tmp_path / "part", keep_best=True, early_stop=2)
    part.fit(stop_at=25)  # interrupted after step 25; its step-20 checkpoint holds best=20 and a streak of 1
    resumed = selecting_trainer(tmp_path / "part", keep_best=True, early_stop=2)
    assert resumed.try_resume() and resumed.step == 20 and resumed.best_step == 20 and resumed.success_streak == 1
    resumed.fit()
    for a, b in ((full, resumed),):
        assert (a.step, a.best_step, a.best_success, a.stopped_early_at) == (b.step, b.best_step, b.best_success, b.stopped_early_at)
        assert a.time_to_success["step"] == b.time_to_success["step"]
        assert state_equal(a.policy.state_dict(), b.policy.state_dict())
        assert state_equal(a.ema.model.state_dict(), b.ema.model.state_dict())
        assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    from dpolicy.policy import load_policy

    assert state_equal(load_policy(ckpts / "best").state_dict(), load_policy(tmp_path / "part" / "checkpoints" / "best").state_dict())
    again = selecting_trainer(tmp_path / "full", keep_best=True, early_stop=2)
    again.fit()  # a stopped run stays stopped
    assert again.step == 35 and again.evaluated == []


def test_stop_success_threshold_and_no_selection_without_evaluations(tmp_path):
    from dpolicy.errors import ConfigError

    tr = selecting_trainer(tmp_path / "a", early_stop=1, stop_success=0.9)
    tr.fit()
    assert tr.stopped_early_at == 10 and tr.best_step == 10 and not (tmp_path / "a" / "checkpoints" / "best").exists()
    for kw in (dict(keep_best=True), dict(early_stop=3)):
        with pytest.raises(ConfigError, match="set eval.every"):
            make_trainer(tmp_path / "b", **kw)
    plain = make_trainer(tmp_path / "c", steps=10)
    plain.fit()
    assert plain.selection()["best_step"] is None and plain.time_to_success is None
    for bad in (dict(early_stop=-1), dict(stop_success=0.0), dict(stop_success=1.5)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


DDP_STOP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from dpolicy.train import distributed as d
    rank, ws, _ = d.init_from_env("cpu")
    from test_trainer import selecting_trainer
    tr = selecting_trainer({out!r}, early_stop=1, stop_success=0.9, keep_best=True)
    tr.fit()
    flat = torch.cat([p.detach().flatten() for p in tr.policy.parameters()])
    json.dump({{"rank": rank, "step": tr.step, "stopped": tr.stopped_early_at, "best": tr.best_step,
               "evaluated": tr.evaluated, "checksum": float(flat.double().sum())}}, open({out!r} + f"/rank{{rank}}.json", "w"))
    d.cleanup()
""")


def test_under_ddp_only_rank_0_evaluates_and_every_rank_stops_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "ddp_stop.py"
    script.write_text(DDP_STOP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
                          str(script)], capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["evaluated"] == [5, 10] and r1["evaluated"] == []
    assert r0["step"] == r1["step"] == r0["stopped"] == r1["stopped"] == 10 and r0["best"] == r1["best"] == 10
    assert r0["checksum"] == r1["checksum"]
    assert (out / "checkpoints" / "best" / "best.json").exists()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on a CPU")
def test_compiled_training_on_the_cpu_matches_eager_and_saves_plain_weights(tmp_path):
    """``train.compile=true`` compiles the step on any device (inductor on a CPU); it computes the same losses as the
    eager step and the checkpoint carries the policy's own parameter names, not the compiled wrapper's."""
    eager = [h["loss"] for h in make_trainer(tmp_path / "eager", steps=10, ckpt_every=10).fit()]
    tr = make_trainer(tmp_path / "compiled", steps=10, ckpt_every=10, compile=True)
    assert tr.model is not tr.policy  # the wrapper runs the step, the raw policy is saved
    compiled = [h["loss"] for h in tr.fit()]
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    loaded = load_checkpoint(tmp_path / "compiled" / "checkpoints")
    assert state_equal(loaded.state_dict(), tr.ema.model.state_dict())


def test_a_step_that_cannot_be_compiled_is_one_sentence_before_anything_is_written(tmp_path, monkeypatch):
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    torch._dynamo.reset()  # nothing compiled earlier in this process may stand in for the compiler
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    tr = make_trainer(tmp_path, steps=5, compile=True)
    with pytest.raises(ConfigError, match=r"train.compile=true could not compile the training step .*C\+\+ compiler.*"
                                          r"set train.compile=false") as err:
        tr.fit()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    torch._dynamo.reset()
