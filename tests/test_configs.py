"""Every YAML in configs/ composes, and the composed train configs validate into RunConfig."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dpolicy.cli.common import CONFIG_DIR
from dpolicy.config import RunConfig, from_dict
from dpolicy.errors import ConfigError

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
