"""Every YAML in configs/ composes and validates into its command's dataclass; the dataclasses own the
defaults (the YAML repeats them, never changes them); ``from_dict`` checks types and ranges."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dpolicy.cli.common import CONFIG_DIR
from dpolicy.cli.common import settings
from dpolicy.config import (CollectConfig, ComposeConfig, DataConfig, DeployConfig, EvalConfig, EvaluateConfig, NetConfig,
                            PolicyConfig, RunConfig, TaskConfig, TrainConfig, check_device, from_dict, parse_field)
from dpolicy.drive.config import DriveConfig
from dpolicy.errors import ConfigError
from dpolicy.rl.agent import DSRLConfig
from dpolicy.rl.finetune import FinetuneConfig
from dpolicy.rl.train import SteerConfig

ROOT = Path(CONFIG_DIR)
GROUPS = {p.name: sorted(q.stem for q in p.glob("*.yaml")) for p in ROOT.iterdir() if p.is_dir()}
PRIMARY = sorted(p.stem for p in ROOT.glob("*.yaml"))


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    d = OmegaConf.to_container(cfg, resolve=False)
    d.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(d), resolve=True)


def test_every_yaml_is_covered():
    files = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.yaml")}
    covered = {f"{n}.yaml" for n in PRIMARY} | {f"{g}/{o}.yaml" for g, opts in GROUPS.items() for o in opts}
    assert files == covered and len(files) >= 10


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_configs_compose(name):
    assert _compose(name)


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    run = from_dict(RunConfig, _compose("train", [f"{group}={option}"]))
    if group == "process":
        assert {"ddpm": "ddpm", "diffusion": "ddim", "flow": "euler", "regression": "direct", "edm": "heun"}[option] == run.policy.process.sampler
    if group == "net":
        assert run.policy.net.type in option
    if group == "task":
        assert run.task.name == option


def test_unknown_keys_are_rejected_with_their_name():
    d = _compose("train")
    d["policy"]["net"]["widht"] = 3
    with pytest.raises(ConfigError, match="policy.net.widht"):
        from_dict(RunConfig, d)
    d = _compose("train")
    d["trian"] = {}
    with pytest.raises(ConfigError, match="trian"):
        from_dict(RunConfig, d)


def test_inconsistent_values_are_rejected():
    with pytest.raises(ConfigError, match="Ta=20"):
        from_dict(RunConfig, _compose("train", ["policy.Ta=20"]))
    with pytest.raises(ConfigError, match="sampler='euler' does not fit"):
        from_dict(RunConfig, _compose("train", ["policy.process.sampler=euler"]))


# configs/<name>.yaml -> the dataclass its command builds, and the settings a run needs that have no default
COMMANDS = {"train": (RunConfig, []), "eval": (EvaluateConfig, ["checkpoint=x"]), "collect": (CollectConfig, []),
            "deploy": (DeployConfig, ["checkpoint=x"]), "compose": (ComposeConfig, ["parents=[x]"]),
            "steer": (SteerConfig, ["base=x"]), "drive": (DriveConfig, []), "finetune": (FinetuneConfig, ["base=x"])}
RECIPE = ("train", "policy", "eval")  # a task file's training recipe, dropped by the commands other than train


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _differences(cls, values: dict, where=""):
    """(key, YAML value, dataclass default) for each leaf of ``values`` whose value differs from the default."""
    fields, hints = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    for k, v in values.items():
        key = f"{where}.{k}" if where else k
        assert k in fields, f"{key} is set in the YAML but is not a field of {cls.__name__}"
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            yield from _differences(hints[k], v, key)
        elif parse_field(cls, k, v, where) != _default(fields[k]):
            yield key, v, _default(fields[k])


def test_every_command_has_its_dataclass():
    assert sorted(COMMANDS) == PRIMARY


@pytest.mark.parametrize("name", PRIMARY)
def test_yaml_values_equal_the_dataclass_defaults(name):
    """The dataclasses own the defaults; a primary YAML only lists the keys a command line may override.

    The rule: every leaf that configs/<name>.yaml itself sets (its ``defaults`` list and ``hydra`` node
    aside, interpolations resolved within the file) must equal the default of that field in the
    command's dataclass, after the same type conversion ``from_dict`` applies (so ``1.0e-3`` equals
    0.001 and null on a field that is not Optional stands for its default). Group files (configs/task,
    configs/net, configs/process) are explicit recipe overrides and may differ: a task file's training
    budget, say. A recipe value therefore lives in a group file, never silently in a primary YAML.
    """
    cls, _ = COMMANDS[name]
    raw = OmegaConf.load(ROOT / f"{name}.yaml")
    for key in ("defaults", "hydra"):
        raw.pop(key, None)
    values = OmegaConf.to_container(raw, resolve=True)
    assert list(_differences(cls, values)) == []


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_configs_validate_into_their_dataclass(name):
    cls, required = COMMANDS[name]
    obj = settings(cls, _compose(name, required), drop=RECIPE if name != "train" else ())
    assert isinstance(obj, cls)


@pytest.mark.parametrize("name,task", [(n, t) for n in ("collect", "eval", "deploy", "compose") for t in GROUPS["task"]])
def test_task_files_select_a_task_for_every_command(name, task):
    cls, required = COMMANDS[name]
    obj = settings(cls, _compose(name, required + [f"task={task}"]), drop=RECIPE)
    assert obj.task.name == task


def test_the_unified_defaults():
    assert TrainConfig().steps == 4000 and EvalConfig().every == 1000
    rl = DriveConfig().rl
    assert (rl.lr, rl.lr_schedule, rl.scenes_per_iter * rl.group, rl.iters) == (2e-4, "linear", 512, 50)


def test_bench_recipes_differ_from_the_defaults_only_where_they_say():
    """dpolicy-bench's drive and DSRL settings repeat the defaults except their declared recipe values."""
    from dpolicy.bench.drive import FULL
    from dpolicy.bench.steer import DSRL_DEFAULTS, STEER_DEFAULTS

    rl = DriveConfig().rl
    assert (FULL["rl_lr"], FULL["rl_schedule"], FULL["rl_iters"]) == (rl.lr, rl.lr_schedule, rl.iters)
    agent = {k: v for k, v in DSRL_DEFAULTS.items() if getattr(DSRLConfig(), k) != v}
    assert agent == {"q_bounds": (0.0, 1.0)}  # a sparse success reward pays at most 1
    fields = {f.name: _default(f) for f in dataclasses.fields(SteerConfig)}
    assert {k: v for k, v in STEER_DEFAULTS.items() if fields[k] != v} == {"eval_every": 2500}


# from_dict: a value of the wrong type names its key; the right types are converted
BAD_TYPES = [
    (TrainConfig, {"steps": "abc"}, "train.steps='abc' must be an integer"),
    (TrainConfig, {"steps": 2.5}, "train.steps=2.5 must be an integer"),
    (TrainConfig, {"steps": True}, "train.steps=True must be an integer"),
    (TrainConfig, {"steps": [1]}, "train.steps=[1] must be an integer"),
    (TrainConfig, {"lr": "fast"}, "train.lr='fast' must be a number"),
    (TrainConfig, {"lr": False}, "train.lr=False must be a number"),
    (TrainConfig, {"amp": "yes"}, "train.amp='yes' must be true or false"),
    (TrainConfig, {"amp": 1}, "train.amp=1 must be true or false"),
    (TrainConfig, {"betas": 0.9}, "train.betas=0.9 must be a list of numbers"),
    (TrainConfig, {"betas": [0.9, "x"]}, "train.betas[1]='x' must be a number"),
    (TaskConfig, {"env_kwargs": [1]}, "task.env_kwargs=[1] must be a mapping"),
    (TaskConfig, {"name": {"a": 1}}, "task.name={'a': 1} must be a string"),
    (DataConfig, {"max_demos": "many"}, "data.max_demos='many' must be an integer or null"),
    (EvalConfig, {"steps": 1.5}, "eval.steps=1.5 must be an integer or null"),
    (NetConfig, {"down_dims": [8, "x"]}, "policy.net.down_dims[1]='x' must be an integer"),
    (PolicyConfig, {"net": 3}, "policy.net"),
    (PolicyConfig, {"action_scale": "big"}, "policy.action_scale='big' must be a list or null"),
    (RunConfig, {"train": {"steps": "abc"}}, "train.steps='abc' must be an integer"),
    (RunConfig, {"policy": {"process": {"eta": "x"}}}, "policy.process.eta='x' must be a number"),
    (DeployConfig, {"checkpoint": "c", "k": 2.5}, "k=2.5 must be an integer or a string"),
    (DeployConfig, {"checkpoint": "c", "timesteps": [3, "x"]}, "timesteps[1]='x' must be an integer"),
    (DeployConfig, {"checkpoint": "c", "cuda_graph": "on"}, "cuda_graph='on' must be true or false or null"),
    (SteerConfig, {"base": "b", "dsrl": {"q_bounds": 1}}, "dsrl.q_bounds=1 must be a list or null"),
    (DriveConfig, {"data": {"n_train": "abc"}}, "data.n_train='abc' must be an integer"),
    (DriveConfig, {"rl": {"lr": "x"}}, "rl.lr='x' must be a number"),
]


@pytest.mark.parametrize("cls,d,match", BAD_TYPES, ids=[m for _, _, m in BAD_TYPES])
def test_values_of_the_wrong_type_name_their_key(cls, d, match):
    where = {TrainConfig: "train", TaskConfig: "task", DataConfig: "data", EvalConfig: "eval", NetConfig: "policy.net",
             PolicyConfig: "policy"}.get(cls, "")
    with pytest.raises(ConfigError) as e:
        from_dict(cls, d, where)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_values_of_the_right_type_are_converted():
    t = from_dict(TrainConfig, {"steps": 1e4, "lr": 1, "betas": (0.9, 0.99), "seed": "7"}, "train")
    assert (t.steps, t.lr, t.betas, t.seed) == (10000, 1.0, [0.9, 0.99], 7)
    assert isinstance(t.steps, int) and isinstance(t.lr, float)
    r = from_dict(RunConfig, {"task": {"env_kwargs": None, "obs_keys": None}, "eval": {"steps": None}, "device": "cuda:0"})
    assert r.task.env_kwargs == {} and r.task.obs_keys == [] and r.eval.steps is None and r.device == "cuda:0"
    assert from_dict(TrainConfig, {"steps": None}).steps == TrainConfig().steps  # null on a plain field: the default
    d = from_dict(DeployConfig, {"checkpoint": "c", "k": "full", "rate_hz": 50})
    assert d.k == "full" and d.rate_hz == 50.0 and from_dict(DeployConfig, {"checkpoint": "c", "k": "3"}).k == 3
    s = from_dict(SteerConfig, {"base": "b", "dsrl": {"q_bounds": [0, 1]}})
    assert s.dsrl.q_bounds == (0.0, 1.0)


BAD_RANGES = [
    (RunConfig, {"train": {"steps": 0}}, "train.steps=0"), (RunConfig, {"eval": {"steps": 0}}, "eval.steps=0"),
    (RunConfig, {"eval": {"every": -1}}, "eval.every=-1"), (RunConfig, {"data": {"max_demos": 0}}, "data.max_demos=0"),
    (RunConfig, {"train": {"ema_max": 1.5}}, "train.ema_max=1.5"), (RunConfig, {"train": {"betas": [0.9, 1.0]}}, "train.betas"),
    (RunConfig, {"task": {"demo_noise": -0.1}}, "task.demo_noise"), (RunConfig, {"device": "gpu"}, "device='gpu'"),
    (EvaluateConfig, {"checkpoint": "c", "steps": 0}, "steps=0"), (EvaluateConfig, {}, "checkpoint"),
    (CollectConfig, {"valid_fraction": 2}, "valid_fraction=2.0"), (CollectConfig, {"n_demos": -1}, "n_demos=-1"),
    (DeployConfig, {"checkpoint": "c", "execute": 0}, "execute=0"), (DeployConfig, {"checkpoint": "c", "threads": 0}, "threads=0"),
    (DeployConfig, {"checkpoint": "c", "k": "half"}, "k='half'"), (DeployConfig, {"checkpoint": "c", "mode": "x"}, "mode='x'"),
    (ComposeConfig, {"parents": ["a"], "cem": {"population": 1}}, "cem.population=1"),
    (ComposeConfig, {"parents": ["a", "b"], "search": "none", "weights": [1.0]}, "weights"),
    (ComposeConfig, {"parents": ["a"], "select_seed": 100000}, "overlap"),
    (DriveConfig, {"data": {"n_train": -1}}, "data.n_train=-1"), (DriveConfig, {"data": {"n_test": 0}}, "data.n_test=0"),
    (DriveConfig, {"model": {"heads": 3}}, "model.heads=3"), (DriveConfig, {"rl": {"eval_every": 0}}, "rl.eval_every"),
    (DriveConfig, {"tokenizer": {"y_range": [1, 1]}}, "tokenizer.y_range"), (DriveConfig, {"device": "tpu"}, "device='tpu'"),
]


@pytest.mark.parametrize("cls,d,match", BAD_RANGES, ids=[m for _, _, m in BAD_RANGES])
def test_values_out_of_range_name_their_key(cls, d, match):
    with pytest.raises(ConfigError, match=__import__("re").escape(match)):
        from_dict(cls, d)


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_names_accepted(name):
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:", "cuda:x", "cuda0", "CPU", "0", "", "cpu:0"])
def test_device_names_rejected_in_one_sentence(name):
    with pytest.raises(ConfigError, match="is not a device; use auto, cpu, cuda, cuda:N or mps"):
        check_device(name)


def test_every_public_name_of_the_package_imports():
    code = ("import dpolicy, dpolicy.config as c; assert dpolicy.PolicyConfig is c.PolicyConfig; "
            "[getattr(dpolicy, n) for n in dpolicy.__all__]; assert set(dpolicy.__all__) <= set(dir(dpolicy)); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    import dpolicy

    with pytest.raises(AttributeError, match="no_such_name"):
        dpolicy.no_such_name


def test_every_package_folder_is_installed_and_envs_under_its_own_name():
    """pyproject lists the packages explicitly (envs/ installs as dpolicy_envs); a new subpackage must be listed."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {"dpolicy_envs": "envs"}
    found = set()
    for init in list((root / "dpolicy").rglob("__init__.py")) + list((root / "envs").rglob("__init__.py")):
        rel = init.parent.relative_to(root).parts
        found.add(".".join(("dpolicy_envs",) + rel[1:] if rel[0] == "envs" else rel))
    assert found == set(setup["packages"])
    import dpolicy_envs

    assert Path(dpolicy_envs.__file__).resolve().parent == root / "envs"
