"""Reliability: bad input through every command and the Python API, tallied.

Each case feeds one malformed value (wrong type, out of range, unknown option, corrupt file, non-finite
observation, ...) to a command (run in this process, as a user's shell would, exit code and stderr
captured) or to an API call, inside a run directory that already holds earlier results. A case is a
*clear error* when it ends with exit code 2 and one ``error:`` line naming the culprit (API: a
``DPolicyError`` naming it); a *traceback* when anything else escapes; a *file lost* when a file that
was in the run directory before is missing or changed after. ``tests/test_cli.py`` runs the same table.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

CKPT = str(Path(__file__).resolve().parents[2] / "checkpoints" / "avoid_diffusion")
NO_CUDA = not torch.cuda.is_available()

BAD_INPUT = {
    "train": [(a, a.split("=")[0]) for a in [
        "train.steps=abc", "train.steps=0", "train.steps=-5", "train.steps=2.5", "train.steps=true", "train.batch_size=0",
        "train.lr=0", "train.lr=abc", "train.amp=maybe", "train.amp=1", "train.betas=[0.9]", "train.betas=abc",
        "train.ema_max=2", "train.grad_clip=0", "train.warmup_steps=-1", "train.max_bad_steps=0", "train.keep_checkpoints=0",
        "train.log_every=0", "eval.steps=0", "eval.episodes=abc", "eval.episodes=0", "eval.n_envs=0", "eval.every=-1",
        "eval.video=3", "eval.video_episodes=-1", "eval.episodes_during=0", "task.n_demos=0", "task.n_demos=x",
        "task.demo_noise=-1", "task.env_kwargs=5", "task.obs_keys=agent_pos", "data.max_demos=0", "data.path=[1]",
        "policy.To=abc", "policy.To=0", "policy.Tp=1.5", "policy.obs_noise=-0.1", "policy.prefix=-1", "policy.net.hidden=x",
        "policy.net.depth=-1", "policy.net.time_dim=7", "policy.process.eta=abc", "policy.process.clip_sample=often",
        "seed=abc", "train.seed=1.5", "train.no_such_key=1", "policy.vision.encoder=vit", "policy.vision.crop=-1",
        "policy.vision.keypoints=0", "policy.vision.channels=[8,x]", "policy.vision.share=often"]]
    + [(["net=unet", "policy.net.down_dims=[32,x]"], "policy.net.down_dims[1]"),
       (["net=unet", "policy.net.kernel_size=0"], "policy.net.kernel_size"), ("policy.process.steps=0", "process.steps"),
       ("process=nonexistent", "process/nonexistent"), ("task=nope", "task/nope"), ("train.steps=[", "["),
       ("seed=${nope}", "nope"), (["task=lift_image", "policy.vision.pretrained=/nonexistent/resnet18.pt"], "pretrained"),
       (["task=lift_image", "policy.vision.encoder=resnet18", "policy.vision.pretrained=/nonexistent/resnet18.pt"],
        "/nonexistent/resnet18.pt"), ("device=gpu", "device"), ("device=cuda:x", "device"), ("device=7", "device")]
    + ([("device=cuda:3", "device")] if NO_CUDA else []),
    "evaluate": [(a, a.split("=")[0]) for a in [
        "episodes=abc", "episodes=0", "episodes=-2", "episodes=2.5", "n_envs=0", "steps=0", "steps=abc", "video=maybe",
        "video_episodes=-1", "device=tpu", "seed=1.5", "env_kwargs=3", "no_such_key=1", "backend=mpi", "workers=0",
        "workers=abc", "placement=gpu", "shard=0"]]
    + [("checkpoint=null", "checkpoint"), ("task=nope", "task/nope")],
    "collect": [(a, a.split("=")[0]) for a in [
        "n_demos=abc", "valid_fraction=2", "valid_fraction=-0.1", "valid_fraction=1", "valid_fraction=x", "noise_std=-1",
        "keep_failures=sometimes", "seed=x", "out=[1]", "task.env_kwargs=7", "compression=zip", "rerender=[1]"]]
    + [("n_demos=0", "n_demos"), ("task.n_demos=-1", "n_demos"),
       ("rerender=/nonexistent/demos.hdf5", "/nonexistent/demos.hdf5")],
    "deploy": [(a, a.split("=")[0]) for a in [
        "execute=0", "execute=abc", "steps=0", "k=abc", "k=0", "k=2.5", "mode=fast", "episodes=0", "n_envs=0", "threads=0",
        "rate_hz=0", "rate_hz=abc", "max_steps=0", "eval_episodes=-1", "sampler=rk4", "realtime=perhaps", "renoise=2",
        "device=tpu", "cuda_graph=sometimes", "discrete=clip"]] + [("timesteps=[3,x]", "timesteps[1]"),
                                                                   ("checkpoint=null", "checkpoint"),
                                                                   (["mode=async", "strategy=act"], "strategy"),
                                                                   (["mode=async", "delay=-1"], "delay"),
                                                                   (["mode=async", "mask=fuzzy"], "mask"),
                                                                   (["mode=async", "delay=12"], "delay 12"),
                                                                   (["mode=async", "predict=/nonexistent/fm"], "predict"),
                                                                   (["mode=async", "predict_rollouts=5"], "predict_rollouts"),
                                                                   (["mode=async", "predict=d.hdf5", "predict_rollouts=-1"], "predict_rollouts"),
                                                                   (["mode=async", "delay=2", "guidance=trained"], "policy.prefix"),
                                                                   (["mode=async", "guidance=magic"], "guidance")],
    "compose": [(a, a.split("=")[0]) for a in [
        "parents=[]", "parents=a", "episodes=0", "select_episodes=0", "n_envs=abc", "resolution=0", "operator=sum",
        "search=random", "steps=0", "Ta=0", "action_norm_tol=-1", "cem.population=1", "cem.elite_frac=0",
        "cem.iterations=abc", "relative=3", "device=tpu"]]
    + [("search=none", "weights"), ("operator=product", "product"), ("select_seed=100000", "seeds")],
    "steer": [(a, a.split("=")[0]) for a in [
        "env_steps=0", "env_steps=abc", "n_envs=0", "eval_episodes=0", "eval_every=0", "init_steps=-1", "buffer_size=0",
        "sampling_steps=0", "base_eta=-1", "reward_offset=x", "dsrl.lr=0", "dsrl.algo=ppo", "dsrl.hidden=abc",
        "dsrl.gamma=2", "dsrl.q_bounds=[1,0]", "dsrl.tau=0", "dsrl.init_alpha=0", "dsrl.utd=0", "sample_noise=maybe",
        "device=tpu", "backend=mpi", "workers=0"]] + [("base=null", "base")],
    "finetune": [(a, a.split("=")[0]) for a in [
        "algo=trpo", "env_steps=0", "env_steps=abc", "std=0", "lr=-1", "gamma=2", "kl_coef=-1", "ft_steps=0",
        "epochs=0", "backend=mpi", "device=tpu", "bc_steps=0", "buffer=0", "branch=maybe", "common_noise=2",
        "branch_copy=maybe", "awm_weights=softmax", "awm_clip=0", "awm_draws=0"]] + [
        ("base=null", "base"), (["algo=grpo", "episodes_per_iter=10"], "multiple"), (["algo=ppo", "branch=true"], "branch"),
        (["algo=grpo", "branch=true", "branch_horizon=0"], "branch_horizon"), (["algo=grpo", "group=1"], "group"),
        ("base=/nonexistent/policy", "/nonexistent/policy")],
    "drive": [(["collect", a], a.split("=")[0]) for a in [
        "data.n_train=-1", "data.n_train=0", "data.n_train=abc", "data.n_val=-1", "data.n_test=0", "model.d=abc",
        "tokenizer.mode=bins", "tokenizer.resolution=0", "tokenizer.x_range=[1,0]", "train.steps=0", "train.lr=-1",
        "train.batch=abc", "rl.lr=0", "rl.algo=ppo", "rl.lr_schedule=cosine", "rl.iters=0", "rl.eps_low=2",
        "rl.order=sideways", "rl.eval_every=0", "eval.order=sideways", "eval.steps=0", "eval.scenes_in_picture=0",
        "device=tpu", "init=[1]", "rl.kl_coef=-1", "eval.samples=-1", "eval.rule=maybe", "train.proposals=-2",
        "model.planner=oracle"]]
    + [(["collect", "eval.samples=0"], "eval.samples"), (["train", "model.planner=scorer"], "init"),
       (["collect", "model.heads=3"], "model.heads"), (["collect", "rl.group=1"], "rl.group"), (["fly"], "command"),
       (["collect", "no_such_key=1"], "no_such_key"), (["rl"], "init"), (["eval"], "init")],
    "bench": [(["--episodes", "abc"], "--episodes"), (["--episodes", "0"], "--episodes"), (["--seeds", "0"], "--seeds"),
              (["--expert-episodes", "-3"], "--expert-episodes"), (["--tasks", "avoid,nope"], "--tasks"),
              (["--processes", "flo"], "--processes"), (["--sections", "steer", "--steer-tasks", "x"], "--steer-tasks"),
              (["--sections", "steer", "--steer-algos", "ppo"], "--steer-algos"),
              (["--sections", "rollouts", "--backend", "mpi"], "backend"), (["--sections", "rollouts", "--workers", "0"], "0"),
              (["--sections", "envs,nope"], "nope"), (["train.steps=abc"], "train.steps"), (["train.steps=0"], "train.steps"),
              (["eval.every=-1"], "eval.every"), (["--bogus"], "--bogus")],
}
REQUIRED = {"evaluate": [f"checkpoint={CKPT}"], "deploy": [f"checkpoint={CKPT}"], "compose": ["parents=[a,b]"],
            "steer": [f"base={CKPT}"], "finetune": [f"base={CKPT}"]}
CASES = [(cmd, args if isinstance(args, list) else [args], key) for cmd, rows in BAD_INPUT.items() for args, key in rows]


def run_command(command: str, args: list, run_dir: Path) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``dpolicy-<command> args`` run in this process, writing under ``run_dir``."""
    mod = importlib.import_module(f"dpolicy.cli.{command}")
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if command == "drive":
                code = mod.main([args[0] if args else "collect", *args[1:], f"out={run_dir / 'd.hdf5'}", f"run_dir={run_dir}"])
            elif command == "bench":
                code = mod.main([*args, "--out", str(run_dir / "B.md"), "--work", str(run_dir)])
            else:
                argv = sys.argv
                sys.argv = [command, *REQUIRED.get(command, []), *args, f"hydra.run.dir={run_dir}"]
                try:
                    mod.main()
                finally:
                    sys.argv = argv
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is what this counts
            traceback.print_exc(file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _earlier_results(d: Path) -> None:
    """What a run directory holds from an earlier run: a checkpoint, metrics, a dataset."""
    import shutil

    shutil.copytree(CKPT, d / "checkpoints" / "step_0000100" / "model")
    (d / "checkpoints" / "step_0000100" / "COMPLETE").write_text("ok\n")
    (d / "checkpoints" / "latest").write_text("step_0000100\n")
    (d / "metrics.json").write_text('{"success_rate": 0.9}\n')
    (d / "demos.hdf5").write_bytes(b"an earlier dataset")


def classify(code: int, err: str, key: str) -> str:
    lines = err.strip().splitlines()
    if "Traceback" in err:
        return "traceback"
    if code == 2 and len(lines) == 1 and lines[0].startswith("error:") and key in lines[0]:
        return "clear"
    return "unclear"


# -- scenarios: files a user brings --------------------------------------------------------------------------
def _composed(d: Path) -> list:
    from dpolicy.compose import ComposedPolicy

    ComposedPolicy.from_checkpoints([CKPT, CKPT]).save(d / "composed")
    return [f"base={d / 'composed'}", "env_steps=10"]


def _resume(*change):
    def setup(d: Path) -> list:
        _earlier_results(d)
        (d / "demos.hdf5").unlink()
        return [*change, "train.steps=20", "task.n_demos=3", "eval.episodes=2"]
    return setup


def _latest(content: bytes):
    def setup(d: Path) -> list:
        _earlier_results(d)
        (d / "checkpoints" / "latest").write_bytes(content)
        return [f"checkpoint={d / 'checkpoints'}", "episodes=2", "n_envs=2", "video=false"]
    return setup


def _weights_truncated(d: Path) -> list:
    _earlier_results(d)
    w = d / "checkpoints" / "step_0000100" / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    return [f"checkpoint={d / 'checkpoints'}", "episodes=2"]


def _planner_garbage(d: Path) -> list:
    from dpolicy.cli.drive import main

    with contextlib.redirect_stdout(io.StringIO()):
        main(["collect", f"out={d / 'drive.hdf5'}", "data.n_train=2", "data.n_val=0", "data.n_test=1"])
    from dpolicy.drive import MaskedTokenPlanner, TrajectoryTokenizer

    p = MaskedTokenPlanner(TrajectoryTokenizer(), d=16, layers=1, heads=4).save(d / "init" / "planner")
    (p / "model.safetensors").write_bytes(b"\x80\x04garbage, not a checkpoint" * 20)
    return ["eval", f"data.path={d / 'drive.hdf5'}", f"init={d / 'init'}"]


def _foreign_file(d: Path) -> list:
    """A robomimic-layout file written by another tool (gzip, chunked, its own key names, no env)."""
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(d / "theirs.hdf5", "w") as f:
        g = f.create_group("data")
        for i in range(4):
            e = g.create_group(f"demo_{i}")
            n = 40
            e.create_dataset("obs/joint_pos", data=rng.normal(size=(n, 3)).astype(np.float32), compression="gzip", chunks=True)
            e.create_dataset("actions", data=np.tanh(rng.normal(size=(n, 2))).astype(np.float32), compression="gzip")
            e.attrs["num_samples"] = n
    return [f"data.path={d / 'theirs.hdf5'}", "train.steps=20", "train.batch_size=16", "train.progress=false"]


def _without_states(d: Path) -> list:
    """A dataset with no simulator states (an (N, 0) array) given to ``dpolicy-collect rerender=``."""
    from dpolicy.data.robomimic import Demo, write_dataset

    demos = [Demo(obs={"eef_pos": np.zeros((5, 3), np.float32)}, actions=np.zeros((5, 4), np.float32)) for _ in range(2)]
    write_dataset(d / "no_states.hdf5", demos, {"env_name": "dpolicy/Lift-v0", "env_type": "gymnasium", "env_kwargs": {}})
    return [f"rerender={d / 'no_states.hdf5'}", "task=lift", f"out={d / 'rendered.hdf5'}"]


# (command, setup(run_dir) -> args, culprit named in the error, or None when the command must succeed)
SCENARIOS = [
    ("steer", _composed, "composed"),
    ("train", _resume("process=flow"), "process.type"),
    ("train", _resume("net=unet"), "net.type"),
    ("train", _resume("policy.Tp=8", "policy.Ta=4"), "Tp"),
    ("evaluate", _latest(b"\xff\xfe\x00 not a step name"), None),
    ("evaluate", _latest(b"step_0009999\n"), None),
    ("evaluate", _latest(b"../../../etc\n"), None),
    ("evaluate", _weights_truncated, "model.safetensors"),
    ("drive", _planner_garbage, "model.safetensors"),
    ("train", _foreign_file, None),
    ("train", lambda d: ["data.path=/nonexistent/demos.hdf5"], "/nonexistent/demos.hdf5"),
    ("collect", _without_states, "no_states.hdf5"),
]


def run_scenario(command: str, setup, culprit: str | None, root: Path) -> tuple[str, list]:
    """``clear`` / ``ok`` when the command behaves (a clear error naming the culprit, or success where success is
    right), else ``traceback`` / ``unclear`` / ``failed``; and the earlier files it lost."""
    d = root / "run"
    d.mkdir(parents=True)
    args = setup(d)
    before = _snapshot(d)
    # a command that must succeed writes its own results beside the earlier ones; one that must fail gets the run itself
    code, _, err = run_command(command, args, d / "out" if culprit is None else d)
    after = _snapshot(d)
    lost = [f for f, h in before.items() if after.get(f) != h]
    if culprit is None:
        kind = "ok" if code == 0 else ("traceback" if "Traceback" in err else "failed")
    else:  # progress bars of the work done before the error may precede its line
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        kind = classify(code, lines[-1] if lines and "Traceback" not in err else err, culprit)
    return kind, lost


# -- the API ------------------------------------------------------------------------------------------------
def _api_cases() -> list:
    """(name, call, culprit): each call must raise a DPolicyError whose message names the culprit."""
    from dpolicy.config import NetConfig, PolicyConfig, ProcessConfig, RunConfig, from_dict
    from dpolicy.policy import load_policy

    pol = load_policy(CKPT)
    obs = {k: np.zeros((1, pol.To, d), np.float32) for k, d in pol.obs_dims.items()}
    k0 = pol.obs_keys[0]

    def with_obs(**change):
        return lambda: pol.act({**obs, **change}, noise=torch.zeros(1, pol.Tp, pol.action_dim))

    def corrupt_ckpt(mutate):
        def call():
            import shutil

            d = Path(tempfile.mkdtemp()) / "p"
            shutil.copytree(CKPT, d)
            mutate(d)
            return load_policy(d)
        return call
    nan = np.full((1, pol.To, pol.obs_dims[k0]), np.nan, np.float32)
    cases = [
        ("act: NaN observation", with_obs(**{k0: nan}), k0),
        ("act: inf observation", with_obs(**{k0: np.full_like(nan, np.inf)}), k0),
        ("act: wrong observation shape", with_obs(**{k0: np.zeros((1, pol.To, 99), np.float32)}), k0),
        ("act: missing observation key", lambda: pol.act({k: v for k, v in obs.items() if k != k0}), k0),
        ("act: text observation", with_obs(**{k0: "abc"}), k0),
        ("act: NaN noise", lambda: pol.act(obs, noise=torch.full((1, pol.Tp, pol.action_dim), float("nan"))), "noise"),
        ("act: wrong noise shape", lambda: pol.act(obs, noise=torch.zeros(1, 3, 3)), "noise"),
        ("act: steps=0", lambda: pol.act(obs, steps=0), "steps=0"),
        ("load: missing path", lambda: load_policy("/nonexistent/policy"), "does not exist"),
        ("load: meta.json not JSON", corrupt_ckpt(lambda d: (d / "meta.json").write_text("{oops")), "meta.json"),
        ("load: weights truncated", corrupt_ckpt(lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:100])), "model.safetensors"),
        ("load: config.json wrong type", corrupt_ckpt(lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"To": 2', '"To": "two"'))), "To"),
        ("load: normalizer missing", corrupt_ckpt(lambda d: (d / "normalizer.json").unlink()), "normalizer.json"),
        ("config: unknown process", lambda: ProcessConfig(type="vdm"), "vdm"),
        ("config: sampler of another process", lambda: ProcessConfig(type="flow", sampler="ddim"), "sampler"),
        ("config: unknown process option", lambda: ProcessConfig(type="edm", sampler="heun", options={"sigma": 1}), "sigma"),
        ("config: Ta > Tp", lambda: PolicyConfig(Tp=4, Ta=8), "Ta"),
        ("config: wrong type", lambda: from_dict(RunConfig, {"train": {"steps": "many"}}), "train.steps"),
        ("config: unknown key", lambda: from_dict(RunConfig, {"trian": {}}), "trian"),
        ("config: odd time embedding", lambda: NetConfig(time_dim=7), "time_dim"),
    ]
    return cases


def run_api_cases() -> list[tuple[str, str]]:
    from dpolicy.errors import DPolicyError

    results = []
    for name, call, culprit in _api_cases():
        try:
            call()
            results.append((name, "accepted"))
        except DPolicyError as e:
            results.append((name, "clear" if culprit in str(e) and "\n" not in str(e).strip() else "unclear"))
        except Exception:  # noqa: BLE001
            results.append((name, "traceback"))
    return results


def reliability_section(log=print) -> tuple[str, dict]:
    """Run every command case and every API case; the tallies and the cases that were not clear errors."""
    import logging

    logging.disable(logging.WARNING)
    rows, bad = {}, []
    lost_total = 0
    for command, args, key in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "run"
            d.mkdir()
            _earlier_results(d)
            before = _snapshot(d)
            code, _, err = run_command(command, args, d)
            after = _snapshot(d)
        lost = [f for f, h in before.items() if after.get(f) != h]
        lost_total += len(lost)
        kind = classify(code, err, key)
        r = rows.setdefault(command, {"cases": 0, "clear": 0, "traceback": 0, "unclear": 0, "files_lost": 0})
        r["cases"] += 1
        r[kind] += 1
        r["files_lost"] += len(lost)
        if kind != "clear" or lost:
            bad.append(f"`dpolicy-{command} {' '.join(args)}`: {kind}" + (f", lost {lost}" if lost else "")
                       + f" ({(err.strip().splitlines() or [''])[-1][:160]})")
    for command, setup, culprit in SCENARIOS:
        with tempfile.TemporaryDirectory() as tmp:
            kind, lost = run_scenario(command, setup, culprit, Path(tmp))
        r = rows.setdefault("files a user brings", {"cases": 0, "clear": 0, "traceback": 0, "unclear": 0, "files_lost": 0})
        r["cases"] += 1
        r["clear" if kind in ("clear", "ok") else ("traceback" if kind == "traceback" else "unclear")] += 1
        r["files_lost"] += len(lost)
        lost_total += len(lost)
        if kind not in ("clear", "ok") or lost:
            bad.append(f"`dpolicy-{command}` on {setup.__name__}: {kind}" + (f", lost {lost}" if lost else ""))
    api = run_api_cases()
    r = {"cases": len(api), "clear": sum(k == "clear" for _, k in api), "traceback": sum(k == "traceback" for _, k in api),
         "unclear": sum(k in ("unclear", "accepted") for _, k in api), "files_lost": 0}
    rows["Python API"] = r
    bad += [f"API {n}: {k}" for n, k in api if k != "clear"]
    logging.disable(logging.NOTSET)
    from dpolicy.bench.report import table

    total = {k: sum(v[k] for v in rows.values()) for k in ("cases", "clear", "traceback", "unclear", "files_lost")}
    body = ("## Reliability: bad input through every command and the API\n\n"
            "Each case gives one malformed value (wrong type, out of range, 0 where a count is needed, unknown option "
            "or device, a corrupt file, a non-finite or misshapen observation) to a command run in a directory that "
            "already holds an earlier run's checkpoint, metrics and dataset, or to an API call. *Clear*: exit code 2 and "
            "one `error:` line naming the culprit (API: a project error naming it); *traceback*: anything else escaped; "
            "*files lost*: earlier files missing or changed afterwards. The files a user brings: a composed checkpoint given to DSRL, resuming a run with another process / network / chunk length, a `latest` pointer holding garbage (must fall back to the newest complete step and succeed), truncated weights, a corrupt driving planner, a dataset written by another tool with no environment (must train), a missing dataset, a dataset without simulator states given to re-render.\n\n")
    body += table(["where", "cases", "clear errors", "tracebacks", "unclear / accepted", "files lost"],
                  [[k, v["cases"], v["clear"], v["traceback"], v["unclear"], v["files_lost"]] for k, v in rows.items()]
                  + [["all", total["cases"], total["clear"], total["traceback"], total["unclear"], total["files_lost"]]])
    if bad:
        body += "\n\nNot clear:\n\n" + "\n".join(f"- {b}" for b in bad)
    log(f"[reliability] {total}")
    return body, {"rows": rows, "total": total, "not_clear": bad}
