"""Standard benchmarks: robosuite Lift/Can, gym-pusht's PushT, and peers measured side by side.

* ``robosuite_section``: per task, the exact ``dpolicy-train task=robosuite_<task>`` job (scripted-expert
  demos in robomimic layout, training, evaluation on ``episodes`` seeded episodes) with success, Wilson
  CI, the expert's success, env steps/s during collection and evaluation, and wall-clock per stage.
* ``pusht_section``: PushT with the metrics LeRobot reports (success = coverage >= 95% at some step,
  mean of the per-episode max reward, max coverage), env steps/s, reference policies that need no
  demonstrations (random, holding still), and any checkpoint passed in.
* ``peers_section``: our diffusion policy against a loop in the style of Chi et al.'s Diffusion Policy
  built on diffusers' ``DDPMScheduler`` (training: host ``DataLoader`` windows, ``add_noise``, epsilon
  target) and ``DDIMScheduler`` / ``DDPMScheduler`` (sampling), with the same network, measured in one
  process, interleaved; plus the DSRL / DPPO reference hyperparameters next to ours.

Each section returns ``(markdown body, results dict)`` and, when its optional extra is missing, a body
with one line saying what to install (results ``{"skipped": reason}``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dpolicy.bench.report import table

ROBOSUITE_TASKS = ("lift", "can")
ROBOSUITE_INSTALL = "pip install robosuite==1.5.2"
PUSHT_INSTALL = "pip install 'gym-pusht>=0.1.5,<0.2' 'pymunk>=6.6,<7'"
DIFFUSERS_INSTALL = "pip install 'diffusers>=0.42,<0.43'"


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _skip(title: str, reason: str) -> tuple[str, dict]:
    return f"## {title}\n\nSkipped: {reason}\n", {"skipped": reason}


def _ci(m) -> str:
    lo, hi = m["success_ci95"]
    return f"[{lo:.3f}, {hi:.3f}]"


# -- robosuite -------------------------------------------------------------------------------------------
def robosuite_section(work, log=print, episodes: int = 100, tasks=ROBOSUITE_TASKS, extra: list[str] | None = None
                      ) -> tuple[str, dict]:
    """Collect, train and evaluate ``dpolicy-train task=robosuite_<task>`` for each task; success with CIs."""
    title = "robosuite (robomimic low-dim Lift / Can): behaviour cloning from scripted-expert demos"
    if _missing("robosuite"):
        return _skip(title, f"robosuite is not installed ({ROBOSUITE_INSTALL}).")
    from dpolicy.bench.suite import compose_run
    from dpolicy.data.collect import collect_demos
    from dpolicy.train.bc import train_bc

    work = Path(work)
    rows, results = [], {}
    for task in tasks:
        name = f"robosuite_{task}"
        overrides = [f"task={name}", f"eval.episodes={episodes}", *(extra or [])]
        cfg = compose_run(overrides + ["train.progress=false"])
        run_dir = work / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        summary = collect_demos(name, cfg.task.n_demos, run_dir / "demos.hdf5", seed=cfg.seed, progress=False)
        collect_s = time.perf_counter() - t0
        # the training job reads the demos it would otherwise collect itself (same seed, same file)
        cfg = compose_run(overrides + ["train.progress=false", f"data.path={run_dir / 'demos.hdf5'}"])
        t1 = time.perf_counter()
        m = train_bc(cfg, run_dir, progress=False)
        total_s = time.perf_counter() - t1
        eval_s = float(m["eval"].get("wall_time_s") or max(total_s - m["train_time_s"], 1e-9))
        eval_steps = int(sum(m["eval"].get("lengths", [])) or m["eval"]["mean_length"] * m["eval"]["n_episodes"])
        r = {"success_rate": m["success_rate"], "success_ci95": m["success_ci95"], "episodes": m["eval"]["n_episodes"],
             "demos": m["demos"], "expert_success_rate": summary["expert_success_rate"],
             "demo_steps": summary["steps"], "collect_s": collect_s, "collect_steps_per_s": summary["steps"] / collect_s,
             "train_s": m["train_time_s"], "train_steps": m["train_steps"], "eval_s": eval_s,
             "eval_steps_per_s": eval_steps / eval_s, "mean_eval_length": m["eval"]["mean_length"], "params": m["params"],
             "command": "dpolicy-train " + " ".join(overrides)}
        results[name] = r
        log(f"[robosuite] {task}: success {r['success_rate']:.3f} {_ci(r)}, expert {r['expert_success_rate']:.3f}, "
            f"collect {collect_s:.0f}s, train {r['train_s']:.0f}s, eval {eval_s:.0f}s")
        rows.append([task, r["demos"], f"{r['expert_success_rate']:.3f}", f"{r['success_rate']:.3f}", _ci(r),
                     f"{r['mean_eval_length']:.0f}", f"{r['collect_steps_per_s']:.0f}", f"{r['eval_steps_per_s']:.0f}",
                     f"{collect_s:.0f}", f"{r['train_s']:.0f}", f"{eval_s:.0f}", r["train_steps"], f"{r['params']:,}"])
    import robosuite

    body = f"## {title}\n\n"
    body += (f"robosuite {robosuite.__version__} (Panda, OSC_POSE, 20 Hz, robomimic's `env_kwargs`), robomimic's "
             "low-dim keys (`robot0_eef_pos`, `robot0_eef_quat`, `robot0_gripper_qpos`, `object`), success from "
             "`env._check_success()`, rollout horizon 400 as robomimic evaluates; the episode ends at success. Demos "
             "come from the scripted experts in `envs/robosuite_tasks.py` (successful episodes kept), written in "
             f"robomimic's HDF5 layout; evaluation on {episodes} seeded episodes disjoint from the demo seeds. "
             "Residual-MLP diffusion policy (DDIM-10), one process on the CPU. Env steps/s: collection includes the "
             "expert, evaluation includes the policy (batched over 10 envs).\n\n")
    body += table(["task", "demos", "expert success", f"success ({episodes} episodes)", "95% CI (Wilson)",
                   "mean episode length", "env steps/s (collect)", "env steps/s (eval)", "collect (s)", "train (s)",
                   "eval (s)", "train steps", "parameters"], rows)
    body += "\n\nCommands: " + "; ".join(f"`{r['command']}`" for r in results.values())
    return body, results


# -- PushT -----------------------------------------------------------------------------------------------
def pusht_section(work=None, log=print, episodes: int = 50, checkpoints=(), seed: int = 100000,
                  expert_episodes: int = 100, checkpoint_episodes: int = 200) -> tuple[str, dict]:
    """PushT evaluation with LeRobot's metrics: demonstration-free reference policies, the scripted push planner
    and given checkpoints (a policy that reads cameras runs on the pixel observations), beside published figures."""
    title = "PushT (gym-pusht): evaluation with LeRobot's metrics"
    if _missing("gym_pusht"):
        return _skip(title, f"gym-pusht is not installed ({PUSHT_INSTALL}).")
    from dpolicy_envs import pusht
    from dpolicy_envs.adapters import make_pusht

    rows, results = [], {}
    policies = {"random actions": pusht.random_policy, "hold still (target = agent position)": pusht.hold_policy}
    for label, make in policies.items():
        t0 = time.perf_counter()
        r = pusht.evaluate(make, episodes=episodes, seed=seed)
        r["wall_s"] = time.perf_counter() - t0
        results[label] = r
        rows.append(_pusht_row(label, r))
        log(f"[pusht] {label}: success {r['pc_success']:.3f}, avg max reward {r['avg_max_reward']:.3f}, "
            f"{r['steps_per_s']:.0f} steps/s")
    if expert_episodes:
        env = make_pusht()
        t0 = time.perf_counter()
        r = pusht.evaluate(lambda s: pusht.PushTExpert(env, seed=s), episodes=expert_episodes, seed=seed, env=env)
        env.close()
        r["wall_s"] = time.perf_counter() - t0
        results["scripted push planner (PushTExpert)"] = r
        rows.append(_pusht_row("scripted push planner (`PushTExpert`, the demos' source)", r))
        log(f"[pusht] expert: success {r['pc_success']:.3f}, mean max coverage {r['mean_max_coverage']:.3f}")
    for ckpt in checkpoints:
        from dpolicy.policy import load_policy

        policy = load_policy(ckpt)
        view = _pusht_view(policy)
        env = make_pusht(obs_type=view)
        t0 = time.perf_counter()
        r = pusht.evaluate(lambda s, p=policy: _ChunkActor(p, s), episodes=checkpoint_episodes, seed=seed, env=env)
        env.close()
        r["wall_s"] = time.perf_counter() - t0
        label = f"`{Path(str(ckpt)).name}`" + {"pixels_agent_pos": " (pixels)", "state": " (state)"}.get(view, " (keypoints)")
        results[str(ckpt)] = r
        rows.append(_pusht_row(label, r))
        log(f"[pusht] {ckpt}: success {r['pc_success']:.3f}, mean max coverage {r['mean_max_coverage']:.3f}")
    import gym_pusht  # noqa: F401

    version = importlib.metadata.version("gym-pusht")
    body = f"## {title}\n\n"
    body += (f"gym-pusht {version}, 300-step episodes (LeRobot's `max_episode_steps`), seeded episodes from {seed}. "
             "As LeRobot reports them: `pc_success` = share of episodes whose coverage of "
             "the goal T reached 95% (the env's `is_success`, which also ends the episode), `avg_max_reward` = mean over "
             "episodes of the highest per-step reward (reward = min(coverage / 0.95, 1)), `avg_sum_reward`; plus the "
             "mean of each episode's highest coverage (Diffusion Policy's `test_mean_score`). The reference floors and "
             "the planner act on the state; a checkpoint marked (pixels) sees gym-pusht's 96 x 96 camera and the "
             "agent's position, one marked (keypoints) the T's 8 outline keypoints and the agent's position (Diffusion "
             "Policy's low-dimensional observation), one marked (state) gym-pusht's 5-D state. The demos differ from "
             "the published runs' (the scripted planner's, not human teleoperation), and so do the training budgets. "
             "Published, for scale: Diffusion Policy's paper, mean max coverage 0.91 from keypoints and 0.84 from "
             "pixels (CNN, 200 human demos, thousands of epochs on a GPU). Published, for scale (LeRobot's model card `lerobot/diffusion_pusht`, PushT from "
             "pixels, 206 human demos, 200k training steps on a GPU, 500 episodes): Diffusion Policy's original code "
             "64.2% success / 0.957 mean max coverage, LeRobot's port 63.8% / 0.959.\n\n")
    body += table(["policy", "episodes", "pc_success", "95% CI (Wilson)", "avg_max_reward", "avg_sum_reward",
                   "mean max coverage", "env steps/s", "wall (s)"], rows)
    return body, results


def _pusht_view(policy) -> str:
    """gym-pusht's ``obs_type`` that gives a checkpoint's observation keys."""
    if policy.image_shapes:
        return "pixels_agent_pos"
    return "environment_state_agent_pos" if "environment_state" in policy.obs_keys else "state"


def _pusht_row(label, r):
    from dpolicy.eval.stats import wilson_interval

    lo, hi = wilson_interval(r["successes"], r["episodes"])
    r["success_ci95"] = [lo, hi]
    return [label, r["episodes"], f"{r['pc_success']:.3f}", f"[{lo:.3f}, {hi:.3f}]", f"{r['avg_max_reward']:.3f}",
            f"{r['avg_sum_reward']:.2f}", f"{r['mean_max_coverage']:.3f}", f"{r['steps_per_s']:.0f}", f"{r['wall_s']:.1f}"]


class _ChunkActor:
    """A checkpoint as a per-step actor: observation history of To, executes Ta actions of each chunk; its latent
    noise comes from a generator seeded by the episode's seed."""

    def __init__(self, policy, seed: int = 0):
        self.policy, self.hist, self.queue = policy, [], []
        self.To, self.Ta = policy.To, policy.Ta
        self.gen = torch.Generator(device=policy.device).manual_seed(int(seed))

    def __call__(self, obs):
        self.hist = self.hist[1:] + [obs] if self.hist else [obs] * self.To
        if not self.queue:
            o = {k: torch.as_tensor(np.stack([h[k] for h in self.hist]))[None] for k in self.policy.obs_keys}
            self.queue = list(self.policy.act(o, generator=self.gen)[0, :self.Ta].cpu().numpy())
        return self.queue.pop(0)


# -- peers -----------------------------------------------------------------------------------------------
class DiffusersDDPMTrainer:
    """One training step in the style of Chi et al.'s Diffusion Policy: the batch comes from a host
    ``DataLoader``, is normalized, noised with diffusers' ``DDPMScheduler.add_noise`` at uniformly drawn
    timesteps, and the network regresses the scheduler's target; AdamW, EMA, fp32, no compile."""

    def __init__(self, policy, data, batch_size: int, device):
        from diffusers import DDPMScheduler

        from dpolicy.bench.throughput import HostWindows
        from dpolicy.train.ema import EMA

        p = policy.process
        self.policy, self.device, self.K = policy, device, p.levels
        self.pred = "epsilon" if p.prediction == "epsilon" else "sample"
        self.scheduler = DDPMScheduler(num_train_timesteps=p.levels, beta_schedule="squaredcos_cap_v2",
                                       clip_sample=p.clip_sample, prediction_type=self.pred)
        self.loader = torch.utils.data.DataLoader(HostWindows(data), batch_size=batch_size, shuffle=True, num_workers=1,
                                                  pin_memory=device.type == "cuda", drop_last=True)
        self.opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)
        self.ema = EMA(policy)
        self._it = iter(self.loader)

    def _batch(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> float:
        b = self._batch()
        obs = {k: v.to(self.device, non_blocking=True) for k, v in b["obs"].items()}
        x0 = self.policy.normalizer.action.normalize(b["action"].to(self.device, non_blocking=True))
        cond = self.policy.encode(obs)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.K, (x0.shape[0],), device=x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        pred = self.policy.net(x_t, t.float() * 100.0 / self.K, cond)
        loss = torch.nn.functional.mse_loss(pred, noise if self.pred == "epsilon" else x0)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.ema.update(self.policy)
        return loss.item()


class DiffusersSampler:
    """Batch-1 decision with a diffusers scheduler loop (``set_timesteps`` per call, net then ``step``)."""

    def __init__(self, policy, kind: str, steps: int):
        from diffusers import DDIMScheduler, DDPMScheduler

        p = policy.process
        pred = "epsilon" if p.prediction == "epsilon" else "sample"
        common = dict(num_train_timesteps=p.levels, beta_schedule="squaredcos_cap_v2", clip_sample=p.clip_sample,
                      prediction_type=pred)
        self.scheduler = (DDIMScheduler(**common, set_alpha_to_one=True, steps_offset=0) if kind == "ddim"
                          else DDPMScheduler(**common))
        self.policy, self.steps, self.K = policy, int(steps), p.levels

    @torch.no_grad()
    def act(self, obs, noise):
        s = self.scheduler
        cond = self.policy.encode(obs)
        s.set_timesteps(self.steps)
        x = noise
        for t in s.timesteps:
            tt = torch.full((x.shape[0],), float(t) * 100.0 / self.K, device=x.device)
            x = s.step(self.policy.net(x, tt, cond), t, x).prev_sample
        return self.policy.normalizer.action.unnormalize(x)


def _pcts(ms):
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "n": int(a.size)}


def peers_section(log=print, task: str = "lift", nets=("mlp", "unet"), batch_size: int = 256, train_steps: int = 60,
                  repeats: int = 3, decisions: int = 200, threads: int = 1) -> tuple[str, dict]:
    """Ours vs a diffusers-scheduler Diffusion Policy loop with the same network: latency and throughput."""
    title = "Peers: our diffusion policy vs a Chi et al.-style loop on diffusers' schedulers (same network)"
    if _missing("diffusers"):
        return _skip(title, f"diffusers is not installed ({DIFFUSERS_INSTALL}).")
    import diffusers

    from dpolicy.bench.latency import torch_threads
    from dpolicy.bench.suite import compose_run, task_windows
    from dpolicy.bench.throughput import our_loop
    from dpolicy.train.bc import build_policy

    import os

    device = torch.device("cpu")
    lat_rows, thr_rows, results = [], [], {"latency": {}, "throughput": {}}
    load0 = os.getloadavg()[0]
    for net, cfg, data, make in task_windows(task, nets, device):
        params = sum(p.numel() for p in make().parameters())
        n_steps = train_steps if net == "mlp" else max(train_steps // 4, 10)
        # -- training throughput, alternating repeats
        ours, peer = [], []
        with torch_threads(threads):
            for _ in range(repeats):
                pol = make().to(device)
                tr = DiffusersDDPMTrainer(pol, data, batch_size, device)
                tr.step()  # warm-up (starts the loader worker)
                t0 = time.perf_counter()
                for _ in range(n_steps):
                    tr.step()
                peer.append(n_steps * batch_size / (time.perf_counter() - t0))
                del tr
                ours.append(our_loop(make().to(device), data, batch_size, n_steps, device))
        mo, mp = statistics.median(ours), statistics.median(peer)
        results["throughput"][net] = {"ours_samples_per_s": mo, "peer_samples_per_s": mp, "ratio": mo / mp,
                                      "ours_all": ours, "peer_all": peer, "steps": n_steps, "params": params}
        thr_rows.append([net, f"{params:,}", batch_size, n_steps, f"{mp:,.0f}", f"{mo:,.0f}", f"{mo / mp:.2f}x"])
        log(f"[peers] train {net}: ours {mo:.0f}/s, diffusers loop {mp:.0f}/s, ratio {mo / mp:.2f}")
        # -- batch-1 decision latency, interleaved per decision
        policy = make().to(device).eval()
        ddpm_cfg = compose_run([f"task={task}", f"net={net}", "policy.process.sampler=ddpm", "policy.process.steps=100"])
        ours_ddpm = build_policy(ddpm_cfg.policy, data).to(device).eval()
        ours_ddpm.load_state_dict(policy.state_dict())
        configs = {"DDIM-10": (lambda o, z: policy.act(o, noise=z), DiffusersSampler(policy, "ddim", 10).act),
                   "DDPM-100": (lambda o, z: ours_ddpm.act(o, noise=z), DiffusersSampler(policy, "ddpm", 100).act)}
        n_dec = decisions if net == "mlp" else max(decisions // 4, 20)
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, len(data.actions), (n_dec,), generator=g)
        with torch_threads(threads):
            for sched, (ours_fn, peer_fn) in configs.items():
                t_o, t_p = [], []
                for j, i in enumerate(idx.tolist()):
                    o = {k: v[i:i + 1].unsqueeze(1).expand(1, cfg.policy.To, -1).contiguous() for k, v in data.obs.items()}
                    z = torch.randn(policy.chunk_shape(1), generator=g)
                    pair = [(ours_fn, t_o), (peer_fn, t_p)]
                    for fn, acc in (pair if j % 2 == 0 else pair[::-1]):
                        t0 = time.perf_counter()
                        fn(o, z)
                        acc.append((time.perf_counter() - t0) * 1e3)
                so, sp = _pcts(t_o[3:]), _pcts(t_p[3:])
                results["latency"][f"{net}/{sched}"] = {"ours_ms": so, "peer_ms": sp, "ratio": sp["p50"] / so["p50"]}
                lat_rows.append([net, sched, f"{so['p50']:.2f}", f"{so['p90']:.2f}", f"{sp['p50']:.2f}",
                                 f"{sp['p90']:.2f}", f"{sp['p50'] / so['p50']:.2f}x"])
                log(f"[peers] latency {net}/{sched}: ours p50 {so['p50']:.2f} ms, diffusers {sp['p50']:.2f} ms")
    results["load_average"] = [load0, os.getloadavg()[0]]
    body = f"## {title}\n\n"
    body += (f"diffusers {diffusers.__version__}; task `{task}` (100 expert demos), CPU, {threads} torch thread(s), one "
             "process. The peer is written in the style of Diffusion Policy's training and sampling code: host "
             "`Dataset`/`DataLoader` windows (num_workers=1), `DDPMScheduler.add_noise` at uniform timesteps, fp32, "
             "AdamW + EMA; sampling calls `set_timesteps` then `net` + `scheduler.step` per step. Both sides use the "
             "same network object, normalizer, cosine (`squaredcos_cap_v2`) betas over 100 levels, clipping and "
             "prediction type, so they differ only in the loop. Training: samples/s, medians of "
             f"{repeats} alternating repeats. Latency: one decision (observation -> action chunk, batch 1), the two "
             "alternating per decision with the same observation and noise; ratio = peer p50 / ours p50 (> 1: ours "
             f"faster). 1-minute load average at start / end: {load0:.1f} / {results['load_average'][1]:.1f} on "
             f"{os.cpu_count()} cores (a shared machine: the ratios, interleaved, are the robust figures).\n\n")
    body += "### Training throughput\n\n" + table(
        ["network", "parameters", "batch", "timed steps", "diffusers loop samples/s", "ours samples/s", "ratio (ours / peer)"],
        thr_rows)
    body += "\n\n### Decision latency (batch 1)\n\n" + table(
        ["network", "schedule", "ours p50 (ms)", "ours p90 (ms)", "diffusers p50 (ms)", "diffusers p90 (ms)",
         "ratio (peer / ours)"], lat_rows)
    hp_body, hp = hyperparameter_table()
    body += "\n\n" + hp_body
    results["hyperparameters"] = hp
    return body, results


# reference settings from the public configs: ajwagen/dsrl cfg/robomimic/dsrl_can.yaml, irom-princeton/dppo robomimic Can
DSRL_CAN = {"algorithm": "dsrl_na", "action_magnitude": 1.5, "utd": 20, "noise_critic_steps": 10, "hidden": 2048,
            "layers": 3, "lr": 3e-4, "batch_size": 256, "tau": 0.005, "gamma": 0.99, "target_entropy": 0.0,
            "init_steps": 1501, "n_envs": 4, "eval_episodes": 200, "base_net": "DiffusionMLP [512, 512, 512]",
            "denoising_steps": 20, "sampler": "DDIM-8", "Ta": 4, "To": 1, "max_episode_steps": 300}
DPPO_CAN = {"base_net": "DiffusionMLP [512, 512, 512], time_dim 16", "denoising_steps": 20, "Ta": 4, "Tp": 4, "To": 1,
            "ft_denoising_steps": 10, "n_envs": 50, "max_episode_steps": 300, "gamma": 0.999, "actor_lr": 1e-4,
            "critic_lr": 1e-3}


CAN_HORIZON = 400  # envs.robosuite_tasks.TASKS["robosuite_can"][1], robomimic's PH rollout horizon


def hyperparameter_table() -> tuple[str, dict]:
    """DSRL's and DPPO's robomimic Can settings next to ours (read from our configs, not typed in)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dpolicy.bench.suite import compose_run
    from dpolicy.cli.common import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        steer = OmegaConf.to_container(compose(config_name="steer"), resolve=False)
    base = compose_run(["task=robosuite_can"])
    pol, proc = base.policy, base.policy.process
    net = f"residual MLP {pol.net.depth} x {pol.net.hidden}, time_dim {pol.net.time_dim}" if pol.net.type == "mlp" else pol.net.type
    ds = steer["dsrl"]
    rows = [
        ["base denoiser", DSRL_CAN["base_net"], DPPO_CAN["base_net"], net],
        ["diffusion levels / sampler", f"{DSRL_CAN['denoising_steps']} / {DSRL_CAN['sampler']}",
         f"{DPPO_CAN['denoising_steps']} (fine-tunes the last {DPPO_CAN['ft_denoising_steps']})",
         f"{proc.train_steps} / {proc.sampler.upper()}-{proc.steps}"],
        ["To / Tp / Ta", f"{DSRL_CAN['To']} / 4 / {DSRL_CAN['Ta']}", f"{DPPO_CAN['To']} / {DPPO_CAN['Tp']} / {DPPO_CAN['Ta']}",
         f"{pol.To} / {pol.Tp} / {pol.Ta}"],
        ["episode length (Can)", DSRL_CAN["max_episode_steps"], DPPO_CAN["max_episode_steps"],
         f"{(base.task.env_kwargs or {}).get('horizon', CAN_HORIZON)} (robomimic's PH horizon)"],
        ["DSRL algorithm", DSRL_CAN["algorithm"], "-", f"dsrl_{ds['algo']}"],
        ["noise bound (action_magnitude)", DSRL_CAN["action_magnitude"], "-", ds["action_magnitude"]],
        ["actor / critic MLP", f"{DSRL_CAN['layers']} x {DSRL_CAN['hidden']}, LayerNorm + Tanh", "critic 3 x 256, Mish",
         f"{ds['layers']} x {ds['hidden']}, LayerNorm + Tanh"],
        ["update-to-data ratio", DSRL_CAN["utd"], "-", ds["utd"]],
        ["noise-critic steps per update", DSRL_CAN["noise_critic_steps"], "-", ds["noise_critic_steps"]],
        ["lr / batch / tau / gamma", f"{DSRL_CAN['lr']} / {DSRL_CAN['batch_size']} / {DSRL_CAN['tau']} / {DSRL_CAN['gamma']}",
         f"actor {DPPO_CAN['actor_lr']}, critic {DPPO_CAN['critic_lr']} / - / - / {DPPO_CAN['gamma']}",
         f"{ds['lr']} / {ds['batch_size']} / {ds['tau']} / {ds['gamma']}"],
        ["target entropy", DSRL_CAN["target_entropy"], "-", ds["target_entropy"]],
        ["entropy bonus in the TD target", "yes (SB3 soft backup)", "-", "yes" if ds["backup_entropy"] else "no"],
        ["TD-target bounds", "none", "-", ds["q_bounds"] or "none (the DSRL bench: [0, 1])"],
        ["random warm-up steps", DSRL_CAN["init_steps"], "-", steer["init_steps"]],
        ["parallel envs", DSRL_CAN["n_envs"], DPPO_CAN["n_envs"], steer["n_envs"]],
    ]
    body = ("### Reference hyperparameters: DSRL and DPPO on robomimic Can vs ours\n\n"
            "DSRL from `ajwagen/dsrl` `cfg/robomimic/dsrl_can.yaml`, DPPO from `irom-princeton/dppo`'s robomimic Can "
            "configs; ours read from `configs/steer.yaml` and `configs/task/robosuite_can.yaml` at run time. Ours are "
            "CPU-sized (narrower networks, fewer updates per step); the task, observation keys, controller and "
            "success test are the same robomimic Can.\n\n")
    body += table(["setting", "DSRL (Can)", "DPPO (Can)", "dpolicy"], rows)
    return body, {"dsrl": DSRL_CAN, "dppo": DPPO_CAN, "ours": {"steer": ds, "policy": {"To": pol.To, "Tp": pol.Tp, "Ta": pol.Ta}}}
