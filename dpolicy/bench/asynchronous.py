"""Deployment under inference delay: success against the delay d (control steps the env advances while the
policy computes) for every asynchronous strategy, with synchronous chunked and RTI execution as references,
the action discontinuity at chunk switches, and a plot of success against delay.

Each cell is ``evaluate_async`` over the same evaluation seeds (200 episodes by default, Wilson intervals).
The RTC settings (mask, guidance weight, guided window; for a checkpoint trained with committed prefixes,
``policy.prefix``, also RTC's training-time form, ``guidance=trained``) are chosen per task on separate selection
seeds at ``d = Ta / 2``, under the rows' own replanning horizon and observation (stale, or predicted for RTC's
predicted-observation row) by the one-standard-error rule: the smoothest switch among the settings whose selection
success is within one standard error of the best's (its binomial error on the selection episodes), then used at
every delay. A switch's discontinuity is reported raw (the action jump at switch steps) and as
what the switch adds: the mean jump at switches minus the mean jump within chunks (a task whose actions jump
within chunks, such as lift's gripper, has that much at any step).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from dpolicy.bench.report import table

DELAYS = (0, 1, 2, 4, 6)
STRATEGIES = ("naive", "ensemble", "bid", "rtc")
RTC_CHOICES = ({"mask": "soft", "beta": 5.0}, {"mask": "soft", "beta": 1.0}, {"mask": "hard", "beta": 5.0})
TRAINED = {"mask": "hard", "guidance": "trained"}  # for checkpoints trained with policy.prefix >= every delay
SEED, EPISODES = 100000, 200  # the evaluation cells' first seed and episode count by default
RTI_SELECT_EPISODES = 50  # selection episodes of the reference RTI row's timestep list (the RTI section's count)
SELECT_EPISODES = 100  # selection episodes per RTC setting by default


def rtc_choices(Ta: int) -> tuple[dict, ...]:
    """The RTC settings tried per task: the paper's soft mask over the whole overlap at two guidance weights, the hard
    mask, and the soft mask over a short window (Ta, and Ta / 2 with a stronger weight), which holds the switch
    smooth without tying a chunk that is replanned often to plans several replans old."""
    return RTC_CHOICES + ({"mask": "soft", "beta": 5.0, "overlap": Ta}, {"mask": "soft", "beta": 10.0, "overlap": max(Ta // 2, 1)})


def choose(candidates: list[tuple[float, float, str, dict]], episodes: int, tolerance: float | None = None):
    """From ``(selection success, switch excess, tag, settings)`` measured on ``episodes`` selection episodes each: the
    smallest switch excess among the settings whose success is within ``tolerance`` of the best, ties by success.
    The tolerance is by default one standard error of the best success, ``sqrt(p (1 - p) / episodes)`` (the
    one-standard-error rule of model selection: RTC exists for smooth switches, and a success difference inside the
    selection's own noise should not buy a rougher one; more selection episodes resolve finer differences)."""
    best = max(c[0] for c in candidates)
    tol = math.sqrt(best * (1 - best) / episodes) if tolerance is None else tolerance
    return min((c for c in candidates if c[0] >= best - tol - 1e-9), key=lambda c: (c[1], -c[0]))


def _tag(choice: dict) -> str:
    if choice.get("guidance") == "trained":
        return "trained prefix"
    over = f", overlap {choice['overlap']}" if choice.get("overlap") else ""
    return f"{choice['mask']}, beta {choice['beta']:g}{over}"


def _excess(r: dict) -> float:
    """What a switch adds to the action jump: mean jump at switches minus mean jump within chunks."""
    return r["switch_jump_mean"] - r["within_jump_mean"]


def _fmt(r) -> str:
    lo, hi = r["success_ci95"]
    return f"{r['success_rate']:.3f} [{lo:.2f}, {hi:.2f}]"


# the forward model's scripted demonstrations, fitting steps and episodes of the policy itself
FORWARD_DEMOS, FORWARD_STEPS, FORWARD_ROLLOUTS = 1000, 20_000, 0


def forward_model_for(pol, name: str, work: Path, log=print, demos: int = FORWARD_DEMOS, seed: int = 500000,
                      steps: int = FORWARD_STEPS, rollouts: int = FORWARD_ROLLOUTS, rollout_seed: int = 600000):
    """The task's forward model, fitted for ``steps`` steps on ``demos`` scripted demonstrations (seeds far from every
    evaluation seed) and ``rollouts`` episodes of the policy itself (synchronous chunked execution, seeds
    ``rollout_seed`` on), cached in ``work`` under its recipe; returns the model and its fit statistics."""
    from dpolicy.data.collect import collect_demos
    from dpolicy.deploy.forward import ForwardModel, fit_forward_model, fitting_demos
    from dpolicy.tasks import env_factory_for

    tag = forward_tag(demos, steps, rollouts)
    out, stats_file = work / f"forward_{name}_{tag}", work / f"forward_{name}_{tag}.json"
    if (out / "forward.json").exists() and stats_file.exists():
        return ForwardModel.load(out), json.loads(stats_file.read_text())
    task = str(pol.metadata.get("task") or name.split("_")[0])
    path = work / f"forward_{name}_demos{demos}.hdf5"
    if not path.exists():
        collect_demos(task, demos, path, seed=seed, progress=False,
                      env_kwargs=(pol.metadata.get("env_args") or {}).get("env_kwargs"))
    data = fitting_demos(path, pol, env_factory_for(pol), rollouts, seed=rollout_seed)
    model, st = fit_forward_model(data, pol.obs_keys, steps=steps)
    model.save(out)
    st["demos"], st["task"], st["steps"], st["rollouts"] = demos, task, steps, rollouts
    stats_file.write_text(json.dumps(st, indent=1))
    log(f"async: forward model for {name}: {st['transitions']} transitions, val rmse / delta std "
        f"{worst_error(st):.3f} at most")
    return model, st


def worst_error(stats: dict) -> float:
    """The forward model's largest held-out one-step error relative to the spread of the per-step change, over the
    dimensions that change (a constant observation such as push's goal has no spread to compare with)."""
    return max((r / v for r, v in zip(stats["val_rmse"], stats["val_delta_std"]) if v > 1e-6), default=0.0)


def forward_tag(demos: int, steps: int, rollouts: int = 0) -> str:
    """The forward model's recipe in its cache names and in the keys of the cells planned from its predictions."""
    return f"fm{demos}d{steps}s" + (f"{rollouts}r" if rollouts else "")


def horizon_for(rule: str, Ta: int, d: int) -> int | None:
    """Actions executed per chunk: ``Ta`` = max(Ta, d) (the executor's default), ``half`` = max(Ta // 2, d, 1)
    (replan twice as often: fresher observations for a reactive task)."""
    return None if rule == "Ta" else max(Ta // 2, d, 1)


def async_section(work: Path, log=print, checkpoints=None, episodes: int = EPISODES, select_episodes: int = SELECT_EPISODES,
                  delays=DELAYS, seed: int = SEED, select_seed: int = 0, plot_path="docs/img/async_delay.png",
                  strategies=STRATEGIES, predict: bool = False, horizon: str = "Ta", forward_demos: int = FORWARD_DEMOS,
                  forward_steps: int = FORWARD_STEPS, forward_rollouts: int = FORWARD_ROLLOUTS,
                  rti_select_episodes: int = RTI_SELECT_EPISODES):
    import torch

    from dpolicy.bench.latency import default_discrete
    from dpolicy.deploy import evaluate_controller
    from dpolicy.deploy.asynchronous import AsyncConfig, evaluate_async
    from dpolicy.policy import load_policy
    from dpolicy.tasks import env_factory_for

    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[2] / "checkpoints"
    checkpoints = [Path(c) for c in (checkpoints or [root / f"{t}_flow" for t in ("avoid", "push", "lift")])]
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    stores = {ck.name: work / f"async_{ck.name}.json" for ck in checkpoints}  # finished cells: a rerun does only the rest
    done = {k: v for st in stores.values() if st.exists() for k, v in json.loads(st.read_text()).items()}

    def cell(key, fn):
        if key not in done:
            store = stores[key.split("|")[0]]
            t0 = time.perf_counter()
            done[key] = fn()
            done[key]["wall_s"] = time.perf_counter() - t0
            _add_cell(store, key, done[key])
            log(f"async: {key}: success {done[key]['success_rate']:.3f} ({done[key]['wall_s']:.0f} s)")
        return done[key]

    def run_async(pol, env_fn, n, s0, predictor=None, **kw):
        def fn():
            if "delay" in kw:
                kw.setdefault("horizon", horizon_for(horizon, pol.Ta, kw["delay"]))
            res, extra = evaluate_async(pol, env_fn, AsyncConfig(**kw), n_episodes=n, n_envs=10, seed=s0,
                                        predictor=predictor)
            d = res.to_dict()
            return {k: d[k] for k in ("success_rate", "success_ci95", "mean_return", "n_episodes")} | extra
        return fn

    body, curves = [], {}
    for ck in checkpoints:
        pol = load_policy(str(ck), "cpu")
        env_fn = env_factory_for(pol)
        name = ck.name
        half = pol.Ta // 2
        fits = [d for d in delays if d + max(pol.Ta, d) <= pol.Tp]
        trained = getattr(getattr(pol, "cfg", None), "prefix", 0) >= max(fits)
        hkey = "" if horizon == "Ta" else f"|h{horizon}"
        # evaluation cells on other seeds or episode counts than the defaults are cells of their own
        skey = (f"|s{seed}" if seed != SEED else "") + (f"|n{episodes}" if episodes != EPISODES else "")
        predictor, fstats = (forward_model_for(pol, name, work, log, demos=forward_demos, steps=forward_steps,
                                               rollouts=forward_rollouts) if predict else (None, None))
        fkey = f"|{forward_tag(forward_demos, forward_steps, forward_rollouts)}"  # cells planned from predictions name the model's recipe
        nsel = f"|n{select_episodes}" if select_episodes != SELECT_EPISODES else ""

        def select(pred: bool):
            """RTC's settings, chosen on selection seeds at d = Ta / 2 under the rows' own replanning horizon and
            observation (stale or predicted): [(success, switch excess, tag, settings)], the chosen one last."""
            sel = []
            for choice in rtc_choices(pol.Ta) + ((TRAINED,) if trained else ()):
                tag = _tag(choice)
                r = cell(f"{name}|select{'+predicted' if pred else ''}|{tag}|d{half}{hkey}{fkey if pred else ''}{nsel}", run_async(
                    pol, env_fn, select_episodes, select_seed, predictor=predictor if pred else None, strategy="rtc",
                    delay=half, **choice))
                sel.append((r["success_rate"], _excess(r), tag, choice))
            return sel + [choose(sel, select_episodes)]

        chosen = {pred: select(pred) for pred in ((False, True) if predict else (False,)) if "rtc" in strategies}
        # RTI's two-evaluation timestep list, chosen as the RTI section chooses it (on its selection seeds)
        sel_rti = cell(f"{name}|rti-select" + (f"|n{rti_select_episodes}" if rti_select_episodes != RTI_SELECT_EPISODES else ""),
                       lambda: _select_rti(pol, env_fn, rti_select_episodes, log))
        rti_ts = sel_rti["timesteps"]
        refs = {
            "synchronous chunked": cell(f"{name}|chunked{skey}", lambda: _ctrl(evaluate_controller, pol, env_fn, episodes, seed, mode="chunked")),
            "synchronous RTI (K'=2)": cell(f"{name}|rti2{skey}", lambda: _ctrl(evaluate_controller, pol, env_fn, episodes, seed, mode="rti", k=2)),
            f"synchronous RTI {rti_ts} (selected)": cell(f"{name}|rti{rti_ts}{skey}", lambda: _ctrl(
                evaluate_controller, pol, env_fn, episodes, seed, mode="rti", timesteps=rti_ts,
                discrete=default_discrete(pol))),
        }
        # (label, strategy, planned from the predicted observation)
        lines = [(st, st, False) for st in strategies]
        lines += [(f"{st} + predicted obs", st, True) for st in ("naive", "rtc") if predict and st in strategies]
        rows, grid = [], {}
        for label, strat, pred in lines:
            kw = chosen[pred][-1][3] if strat == "rtc" else {}
            ckey = f"|{_tag(kw)}" if strat == "rtc" else ""
            for d in delays:
                s_ = horizon_for(horizon, pol.Ta, d) or max(pol.Ta, d)
                if d + s_ > pol.Tp:
                    continue
                grid[(label, d)] = cell(f"{name}|{label}|d{d}{hkey}{ckey}{skey}{fkey if pred else ''}", run_async(
                    pol, env_fn, episodes, seed, predictor=predictor if pred else None, strategy=strat, delay=d, **kw))
        labels = [lb for lb, _, _ in lines]
        curves[name] = {lb: [(d, grid[(lb, d)]["success_rate"], grid[(lb, d)]["success_ci95"]) for d in delays if (lb, d) in grid]
                        for lb in labels}
        curves[name]["refs"] = {k: v["success_rate"] for k, v in refs.items()}
        for label, strat, pred in lines:
            rows.append([label + (f" ({chosen[pred][-1][2]})" if strat == "rtc" else "")]
                        + [_fmt(grid[(label, d)]) if (label, d) in grid else "" for d in delays])
        for k, v in refs.items():
            rows.append([k] + [_fmt(v)] + ["" for _ in delays[1:]])
        disc = [[lb, d, f"{grid[(lb, d)]['switch_jump_mean']:.3f}", f"{grid[(lb, d)]['switch_jump_max']:.3f}",
                 f"{grid[(lb, d)]['within_jump_mean']:.3f}", f"{_excess(grid[(lb, d)]):+.3f}", f"{grid[(lb, d)]['switch_jerk_mean']:.3f}",
                 f"{grid[(lb, d)]['within_jerk_mean']:.3f}", f"{grid[(lb, d)]['evals_per_step']:.2f}",
                 f"{grid[(lb, d)]['backwards_per_step']:.2f}"] for lb in labels for d in (half,) if (lb, d) in grid]
        # the acceptance-style checks, stated as measured, for RTC (and RTC planning from predicted observations)
        checks = []
        for lb in [x for x in ("rtc", "rtc + predicted obs") if x in labels]:
            naive = "naive" if lb == "rtc" else "naive + predicted obs"
            if naive not in labels or (lb, 0) not in grid or (lb, half) not in grid:
                continue
            r0, rh = grid[(lb, 0)]["success_rate"], grid[(lb, half)]["success_rate"]
            n0, nh = grid[(naive, 0)]["success_rate"], grid[(naive, half)]["success_rate"]
            base = grid[("naive", half)] if "naive" in labels else grid[(naive, half)]
            ratio = grid[(lb, half)]["switch_jump_mean"] / max(base["switch_jump_mean"], 1e-9)
            naive_excess = _excess(base)
            if naive_excess > 0.005:
                added = (f"what a switch adds to the jump (switch minus within) "
                         f"{_excess(grid[(lb, half)]) / naive_excess:.2f}x naive switching's")
            else:  # the ratio of two near-zero (or negative) excesses means nothing
                added = (f"naive switching's jumps at switches are no larger than within chunks here (switch minus "
                         f"within {naive_excess:+.3f}), so there is no switch discontinuity to reduce")
            checks.append(f"{lb} at d = Ta/2 = {half}: {rh:.3f} vs its d = 0 {r0:.3f} ({100 * (rh - r0):+.1f} points); "
                          f"{naive} {nh:.3f} vs {n0:.3f} ({100 * (nh - n0):+.1f} points); {lb} - {naive} at d = {half}: "
                          f"{100 * (rh - nh):+.1f} points; its mean jump at switches is {ratio:.2f}x naive switching's "
                          f"(without predicted obs), and {added}.")
        if predictor is not None:
            own = f" and {fstats['rollouts']} episodes of the policy itself" if fstats.get("rollouts") else ""
            checks.append(f"Forward model: fitted for {fstats['steps']:,} steps on {fstats['transitions']:,} transitions "
                          f"of {fstats['demos']} scripted demos{own}; held-out one-step error at most "
                          f"{worst_error(fstats):.2f} of the per-step change's spread (per dimension).")
        sel_txt = "; ".join(("planning from predicted observations: " if pred else "") + ", ".join(
            f"{tag}: {s:.3f} ({e:+.3f})" for s, e, tag, _ in sel[:-1]) for pred, sel in chosen.items())
        body += [f"**{name}** (Ta = {pol.Ta}, Tp = {pol.Tp}; RTC settings chosen on {select_episodes} selection episodes at "
                 f"d = {half}, success (switch minus within jump)" + (f": {sel_txt})" if chosen else ")"), "",
                 table(["strategy"] + [f"d = {d}" for d in delays], rows), "",
                 table(["strategy", "d", "jump at switches (mean)", "(max)", "jump within chunks", "switch - within",
                        "jerk at switches",
                        "jerk within", "network evals / control step", "backward passes / step"], disc), "",
                 "\n\n".join(checks), ""]
    if plot_path:
        _plot(curves, delays, plot_path)
        body += [f"![success vs delay]({plot_path})"]
    every = "max(Ta, d)" if horizon == "Ta" else "max(Ta / 2, d)"
    head = (f"Each cell: {episodes} episodes (seeds {seed}..), Wilson 95% intervals; d = control steps the environment "
            f"advances while the policy computes (injected, deterministic); a new inference every {every} steps; the "
            "first chunk of an episode is computed before the robot moves. Strategies: naive switching, ACT's temporal "
            "ensembling (m = 0.01), BID's backward coherence over 8 candidates, RTC guided inpainting (its settings chosen per "
            "task by the one-standard-error rule: the smoothest switch among the settings whose selection success is "
            "within one binomial standard error of the best's). Synchronous rows "
            "have no delay (the world waits for the policy); `synchronous RTI [a, 0] (selected)` enters RTI's schedule "
            "at timestep a with two network evaluations per decision, the list chosen as the RTI section chooses it "
            f"(among [1, 0] (= K'=2), [10, 0], [20, 0], [30, 0], [50, 0], on {rti_select_episodes} episodes from seed "
            "300000)."
            + (" `+ predicted obs`: the chunk is planned from the observation a learned forward model predicts for the "
               "step it takes over at, rolled through the committed actions (dpolicy.deploy.forward)." if predict else ""))
    title = "## Deployment under inference delay: asynchronous execution, success against delay (2-core CPU)"
    return "\n".join([title, "", head, ""] + body), done


def _add_cell(store: Path, key: str, value: dict) -> None:
    """Add one finished cell to ``store``, keeping every cell already there: the file is read again just before the
    write (another bench process may have added cells since this one started) and replaced atomically."""
    cells = json.loads(store.read_text()) if store.exists() else {}
    cells[key] = value
    tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cells, indent=1))
    os.replace(tmp, store)


def _select_rti(pol, env_fn, episodes: int, log) -> dict:
    """The two-evaluation RTI timestep list ``select_timesteps`` picks for ``pol`` (the RTI section's candidates and
    selection seeds), as a cell: ``{"timesteps", "scores", "success_rate"}`` (its selection success)."""
    from dpolicy.bench.latency import SPACED, default_discrete, select_timesteps

    two = [ts for ts in SPACED if len(ts) == 2]
    best, scores = select_timesteps(pol, env_fn, candidates=two, episodes=episodes, discrete=default_discrete(pol),
                                    log=lambda m: log(f"async: {m}"))
    return {"timesteps": best, "scores": scores, "success_rate": scores[str(best)]}


def _ctrl(fn, pol, env_fn, episodes, seed, **kw) -> dict:
    r = fn(pol, env_fn, n_episodes=episodes, n_envs=10, seed=seed, **kw)
    return {"success_rate": r.success_rate, "success_ci95": list(r.success_ci95), "mean_return": r.mean_return,
            "n_episodes": r.n_episodes}


def _plot(curves: dict, delays, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (name, c) in zip(axes[0], curves.items()):
        for strat in [k for k in c if k != "refs"]:
            pts = c.get(strat, [])
            if not pts:
                continue
            ds = [p[0] for p in pts]
            ax.plot(ds, [p[1] for p in pts], marker="o", label=strat)
            ax.fill_between(ds, [p[2][0] for p in pts], [p[2][1] for p in pts], alpha=0.15)
        for k, v in c["refs"].items():
            ax.axhline(v, ls=":" if "selected" in k else "--", lw=0.8, color="gray" if "chunked" in k else "black", label=k)
        ax.set_title(name)
        ax.set_xlabel("delay d (control steps)")
        ax.set_xticks(list(delays))
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("success")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
