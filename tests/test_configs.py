"""Config groups and registries agree, and every choice of every group composes and validates."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from prune_eval.config import CONF_DIR, GROUPS, group_choices, group_dir, plan_cell
from prune_eval.data import DATASETS
from prune_eval.data.images import PREPROCESSORS
from prune_eval.methods import method_names
from prune_eval.models.loading import SOURCES
from prune_eval.models.quant import QUANTS

REGISTRIES = {
    "method": method_names,
    "data": DATASETS.names,
    "quant": QUANTS.names,
    "preprocess": PREPROCESSORS.names,
}


def compose_with(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group", sorted(REGISTRIES))
def test_yaml_files_and_registry_agree(group: str) -> None:
    files = group_choices(group)
    assert files == sorted(REGISTRIES[group]()), f"conf/{group}/*.yaml and the {group} registry differ"
    for choice in files:
        assert OmegaConf.load(group_dir(group) / f"{choice}.yaml").name == choice, f"conf/{group}/{choice}.yaml: name must be '{choice}'"


def test_model_yamls_name_a_known_source() -> None:
    for choice in group_choices("model"):
        option = OmegaConf.load(group_dir("model") / f"{choice}.yaml")
        assert option.name == choice
        assert option.source in SOURCES


@pytest.mark.parametrize("group", GROUPS)
def test_every_choice_composes(group: str) -> None:
    for choice in group_choices(group):
        cfg = compose_with([f"{group}={choice}"])
        if group in REGISTRIES or group == "model":
            assert cfg[group].name == choice


@pytest.mark.parametrize("method", group_choices("method"))
def test_every_method_plans_a_cell_on_the_demo(method: str) -> None:
    budgets = {"vanilla": 576}
    cfg = compose_with(["experiment=demo", f"method={method}", f"budget={budgets.get(method, 64)}"])
    spec = plan_cell(cfg)
    assert spec.method.name == method
    assert spec.name.startswith(method)


def test_demo_experiment_selects_toy_synthetic_cpu() -> None:
    cfg = compose_with(["experiment=demo"])
    assert cfg.model.name == "toy" and cfg.data.name == "pope-synthetic" and cfg.device == "cpu" and cfg.quant.name == "fp32"
    assert cfg.name == "demo"


def test_launch_profiles_are_a_group_on_the_search_path() -> None:
    assert "local" in group_choices("launch")
    cfg = compose_with(["launch=local"])
    assert cfg.hydra.launcher._target_.endswith("launchers.LocalLauncher")


def test_equivalent_configs_share_a_cell() -> None:
    a = plan_cell(compose_with(["experiment=demo", "method=vanilla", "budget=64"]))
    b = plan_cell(compose_with(["experiment=demo", "method=vanilla", "budget=128"]))
    c = plan_cell(compose_with(["experiment=demo", "method=vanilla", "seed=1"]))  # vanilla draws no random numbers
    d, e = (plan_cell(compose_with(["experiment=demo", "method=random", "budget=64", f"seed={s}"])) for s in (0, 1))
    assert a.name == b.name == c.name and "_anyseed_" in a.name and d.name != e.name
