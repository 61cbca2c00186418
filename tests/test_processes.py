"""Contract tests every process and sampler must pass: exact recovery under an oracle field,
determinism given the noise, any step count, and the warm-start corruption."""

import math

import pytest
import torch

from dpolicy.process import EDM, Diffusion, Flow, build_process, process_types, sample_loop


def oracle(process, c):
    """The exact field for a data distribution concentrated at the single chunk ``c``."""
    def fn(x, t):
        t = float(t) if not torch.is_tensor(t) or t.ndim == 0 else t
        alpha, sigma = process.coefficients(t)
        return process.join(c.expand_as(x), (x - alpha * c) / sigma, t)  # the field whose x0 is c
    return fn


PROCESSES = [lambda: Diffusion(50, "epsilon", "ddim"), lambda: Diffusion(50, "sample", "ddim"),
             lambda: Diffusion(50, "epsilon", "ddpm"), lambda: Flow("euler"), lambda: Flow("heun"),
             lambda: EDM("heun"), lambda: EDM("euler")]
DETERMINISTIC = [lambda: Diffusion(100, "epsilon", "ddim"), lambda: Flow("euler"), lambda: Flow("heun"),
                 lambda: EDM("heun"), lambda: EDM("euler")]


@pytest.mark.parametrize("make", PROCESSES)
@pytest.mark.parametrize("steps", [1, 3, 10, 50])
def test_oracle_field_recovers_the_data_point(make, steps):
    p = make()
    c = torch.full((1, 4, 2), 0.3)
    x = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(0))
    out = sample_loop(p, oracle(p, c), x, p.schedule(steps), torch.Generator().manual_seed(1))
    assert torch.allclose(out, c.expand_as(out), atol=1e-4), (out - c).abs().max()


@pytest.mark.parametrize("make", DETERMINISTIC)
def test_deterministic_samplers_are_functions_of_the_noise(make):
    p = make()
    assert not p.stochastic
    net = lambda x, t: torch.sin(3 * x) + 0.1 * (t if not torch.is_tensor(t) else t.view(-1, 1, 1))  # noqa: E731
    x = torch.randn(3, 8, 2)
    a = sample_loop(p, net, x.clone(), p.schedule(7))
    b = sample_loop(p, net, x.clone(), p.schedule(7))
    assert torch.equal(a, b)
    c = sample_loop(p, net, x + 0.5, p.schedule(7))
    assert not torch.allclose(a, c)


def test_ddpm_is_stochastic_but_reproducible_with_a_generator():
    p = Diffusion(100, "epsilon", "ddpm")
    assert p.stochastic
    net = lambda x, t: 0.5 * x  # noqa: E731
    x = torch.randn(2, 4, 2)
    run = lambda s: sample_loop(p, net, x.clone(), p.schedule(20), torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 100, 500])
def test_diffusion_schedule_any_step_count(steps):
    p = Diffusion(100)
    sched = p.schedule(steps)
    assert len(sched) == min(steps, 100)
    assert sched[0][0] == 1.0 and sched[-1][1] == 0.0
    assert all(t > tn for t, tn in sched)
    assert all(a[1] == b[0] for a, b in zip(sched[:-1], sched[1:]))


def test_flow_schedule_and_warm_start_from_mid_time():
    p = Flow()
    sched = p.schedule(4, t_start=0.5)
    assert sched[0][0] == 0.5 and sched[-1][1] == 0.0 and len(sched) == 4
    x0, n = torch.ones(1, 2, 1), torch.zeros(1, 2, 1)
    assert torch.allclose(p.noise_to(x0, n, 0.25), 0.75 * x0)


def test_cosine_schedule_matches_reference_values():
    # alpha-bar of the squaredcos_cap_v2 schedule, computed by hand from its definition
    p = Diffusion(100)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(p.alpha_bar[0]) - f(0.01) / f(0.0)) < 1e-9
    assert float(p.alpha_bar[-1]) < 1e-3 and float(p.alpha_bar[0]) > 0.999


@pytest.mark.parametrize("make", PROCESSES)
def test_training_loss_is_zero_for_the_oracle(make):
    p = make()
    c = torch.full((1, 4, 2), -0.2)
    x0 = c.expand(16, 4, 2).clone()

    def fn(x, t):
        out = []
        for i in range(x.shape[0]):
            out.append(oracle(p, c)(x[i:i + 1], float(t[i])))
        return torch.cat(out)
    loss = p.loss(fn, x0, torch.Generator().manual_seed(0))
    assert loss.shape == (16,) and float(loss.max()) < 1e-6


def test_bad_process_options_are_rejected():
    from dpolicy.errors import ConfigError

    with pytest.raises(ConfigError, match="prediction"):
        Diffusion(prediction="v")
    with pytest.raises(ConfigError, match="sampler"):
        Flow(sampler="rk45")


@pytest.mark.parametrize("make", PROCESSES)
def test_split_and_join_are_inverse_and_consistent_with_the_corruption(make):
    p = make()
    p.clip_sample = False  # clipping x0 makes split lossy on purpose
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 6, 2, generator=g), torch.randn(4, 6, 2, generator=g)
    for t in (0.9, 0.5, 0.12):
        alpha, sigma = p.coefficients(t)
        x = p.noise_to(x0, eps, t)
        assert torch.allclose(x, alpha * x0 + sigma * eps, atol=1e-6)
        f = p.join(x0, eps, t)
        a, e = p.split(f, x, t)
        assert torch.allclose(a, x0, atol=1e-4 * max(1.0, sigma)) and torch.allclose(e, eps, atol=1e-4), t


@pytest.mark.parametrize("make", PROCESSES)
def test_time_for_finds_the_time_of_a_signal_to_noise_ratio(make):
    p = make()
    for t, _ in p.schedule(7):
        assert p.time_for(*p.coefficients(t)) == pytest.approx(t, abs=1e-9)
        # the same ratio at another scale (another process's coordinates) maps to the same time
        alpha, sigma = p.coefficients(t)
        assert p.time_for(3 * alpha, 3 * sigma) == pytest.approx(t, abs=1e-9)
    assert p.time_for(1.0, 0.0) == 0.0


def test_discrete_levels_reject_ratios_they_do_not_have():
    d20, d50 = Diffusion(20), Diffusion(50)
    assert d50.time_for(*d20.coefficients(d20.level_time(6))) is None  # t = 0.35: between two of its levels
    assert d50.time_for(*d20.coefficients(d20.level_time(7))) == 0.4  # t = 0.4: one of its levels too
    assert d20.levels == 20 and Flow().levels is None and EDM().levels is None


@pytest.mark.parametrize("make", PROCESSES)
def test_step_is_the_plan_applied_and_counts_its_evaluations(make):
    p = make()
    calls = []

    def net(x, t):
        calls.append(float(t))
        return torch.tanh(x) * 0.3 + 0.01 * float(t)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    sched = p.schedule(6)
    out = sample_loop(p, net, x.clone(), sched, torch.Generator().manual_seed(1))
    assert len(calls) == p.evals(sched)
    g = torch.Generator().manual_seed(1)
    y = x.clone()
    for t, tn in sched:
        plan = p.step_plan(t, tn)
        y = p.apply_step(plan, lambda j, z: net(z, plan.times[j]), y,  # noqa: B023
                         lambda: torch.randn(y.shape, generator=g))  # noqa: B023
    assert torch.equal(out, y)
    assert not torch.equal(x, out)  # and the input was not modified in place
    assert torch.equal(x, torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0)))


def test_heun_spends_two_evaluations_per_step_except_onto_clean_data():
    for p in (Flow("heun"), EDM("heun")):
        assert p.evals(p.schedule(10)) == 19
    for p in (Flow("euler"), EDM("euler"), Diffusion(100)):
        assert p.evals(p.schedule(10)) == 10


@pytest.mark.parametrize("make", PROCESSES)
def test_with_sampler_keeps_the_field_and_swaps_the_step(make):
    p = make()
    for name in p.samplers:
        q = p.with_sampler(name)
        assert q.sampler == name and q.field_signature() == p.field_signature() and q is not p
    from dpolicy.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit"):
        p.with_sampler("rk45")


def test_edm_preconditioning_and_noise_levels():
    p = EDM()
    o = p.options
    assert p.sigma(1.0) == pytest.approx(o.sigma_max) and p.sigma(0.0) == 0.0
    assert p.sigma(1e-12) == pytest.approx(o.sigma_min, rel=1e-6)
    assert p.noise_scale == o.sigma_max
    ts = torch.tensor([0.1, 0.5, 1.0])
    batch = p.net_input_scale(ts).flatten()
    for i, t in enumerate(ts.tolist()):
        assert float(batch[i]) == pytest.approx(p.net_input_scale(t), rel=1e-5)
        assert p.net_input_scale(t) == pytest.approx(1 / math.sqrt(p.sigma(t) ** 2 + o.sigma_data ** 2))
    # sigma decreases along the schedule, rho-spaced: the steps shrink toward the data
    sig = [p.sigma(t) for t, _ in p.schedule(10)]
    assert all(a > b for a, b in zip(sig, sig[1:])) and sig[0] / sig[1] < sig[-2] / sig[-1]


def test_every_registered_process_builds_from_its_config_file():
    from pathlib import Path

    import yaml

    from dpolicy.config import ProcessConfig

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "process").glob("*.yaml"))
    built = {build_process(ProcessConfig(**yaml.safe_load(f.read_text()))).name for f in files}
    assert set(process_types()) <= built, f"a registered process has no configs/process file: {set(process_types()) - built}"


def test_process_config_checks_type_sampler_and_options_by_the_process():
    from dpolicy.config import ProcessConfig
    from dpolicy.errors import ConfigError

    with pytest.raises(ConfigError, match=r"process.type='vdm' is unknown; choose one of \['diffusion', 'edm'"):
        ProcessConfig(type="vdm")
    with pytest.raises(ConfigError, match="process.sampler='ddim' does not fit process.type='edm'"):
        ProcessConfig(type="edm", sampler="ddim")
    with pytest.raises(ConfigError, match=r"process.options \['sigma_mx'\] are unknown for process.type='edm'"):
        ProcessConfig(type="edm", sampler="heun", options={"sigma_mx": 10})
    with pytest.raises(ConfigError, match="process.options.rho='7' must be a float"):
        ProcessConfig(type="edm", sampler="heun", options={"rho": "7"})
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        ProcessConfig(type="edm", sampler="heun", options={"sigma_min": 5.0, "sigma_max": 1.0})
    with pytest.raises(ConfigError, match="takes none"):
        ProcessConfig(type="flow", sampler="euler", options={"rho": 7.0})
    assert build_process(ProcessConfig(type="edm", sampler="euler", options={"sigma_max": 20})).noise_scale == 20.0
