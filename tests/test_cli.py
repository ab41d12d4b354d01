"""The command line itself: prune_eval's own --help, a search path without stray config groups, and
a typo that fails fast (neither torch nor transformers imported)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from prune_eval.config import GROUPS, group_choices
from prune_eval.usage import EXAMPLES, PLAIN_KEY_HELP, plain_keys


def with_stray_folders(folder):
    """A working directory as a user's looks after a few sweeps: outputs/ with sweep folders and YAMLs."""
    for sub in ("outputs/demo/report", "outputs/vz-vs-svlm/visionzip-64_seed0_x", "docs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "outputs" / "demo" / "multirun.yaml").write_text("hydra: {}\n")
    (folder / "docs" / "notes.yaml").write_text("a: 1\n")
    return folder


@pytest.mark.parametrize("where", ["a folder with outputs/", "elsewhere"])
def test_help_is_prune_evals_usage(tmp_path, where) -> None:
    cwd = with_stray_folders(tmp_path) if where == "a folder with outputs/" else tmp_path
    result = run_cli(["--help"], cwd, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: python -m prune_eval [-m]") and "powered by Hydra" not in text
    assert "A cell is one (model, quant, preprocess, data, method" in text
    for group in GROUPS:
        assert re.search(rf"^  {re.escape(group)} +{re.escape(', '.join(group_choices(group)))}  \[", text, re.M), group
    for key, default in plain_keys().items():
        assert f"  {key}={default} " in text, key
    assert [line.strip() for line in text.splitlines() if line.startswith("  python -m prune_eval")] == [c for _, c in EXAMPLES]
    assert "outputs/<name>/<cell>/records/" in text and "outputs/<name>/report/" in text
    assert "outputs:" not in text and "vz-vs-svlm" not in text and "docs" not in text.lower().split("readme")[0]
    assert "budget=64 " in text  # the default: the budget of the question the tool is named by


def test_every_plain_key_has_a_line_in_the_usage() -> None:
    assert set(PLAIN_KEY_HELP) == set(plain_keys())


def test_the_search_path_holds_only_the_configs_and_the_launch_profiles(tmp_path, monkeypatch) -> None:
    """Hydra's config loader, built as hydra.main builds it (search path plugins included), run from a
    folder with outputs/: its groups are exactly prune_eval's. The repository root itself holds conf/,
    docs/, tests/ (and often outputs/): none of them may become a group."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    from prune_eval.config import CONF_DIR

    monkeypatch.chdir(with_stray_folders(tmp_path))
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    groups = set(loader.list_groups("")) - {"hydra"}
    assert groups == set(GROUPS), groups
    assert loader.get_group_options("launch") == group_choices("launch")


def test_the_launch_profiles_source_shows_launch_and_nothing_else(tmp_path) -> None:
    from hydra.core.object_type import ObjectType

    from hydra_plugins.prune_eval_plugins.searchpath import LaunchProfilesConfigSource

    with_stray_folders(tmp_path)
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "mycluster.yaml").write_text("# @package _global_\nlaunch: {partition: gpu}\n")
    (tmp_path / "config.yaml").write_text("a: 1\n")
    source = LaunchProfilesConfigSource("test", f"prune-eval-launch://{tmp_path}")
    assert source.available()
    assert source.list("", None) == ["launch"] and source.list("", ObjectType.CONFIG) == []
    assert source.list("launch", None) == ["mycluster"]
    assert source.is_group("launch") and not source.is_group("outputs") and not source.is_group("outputs/demo")
    assert source.is_config("launch/mycluster.yaml") and not source.is_config("config.yaml")
    assert not source.is_config("outputs/demo/multirun.yaml") and not source.is_config("docs/notes.yaml")
    assert source.load_config("launch/mycluster.yaml").header["package"] == "_global_"


def imported_top_level(stderr: str) -> set[str]:
    """Modules named in `python -X importtime` output."""
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", stderr, re.M)}


@pytest.mark.parametrize("args", [["method=visonzip"], ["-m", "method=visionzip,visonzip", "seed=0,1"], ["budgte=64"], ["--help"]])
def test_a_typo_fails_fast_without_torch_or_transformers(tmp_path, args) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "prune_eval", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    modules = imported_top_level(result.stderr)
    assert "prune_eval" in modules and "omegaconf" in modules  # the importtime output was read
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "transformers"))
    assert not heavy, heavy[:5]
    messages = [line for line in result.stderr.splitlines() if not line.startswith("import time:") and line.strip()]
    if args == ["--help"]:
        assert result.returncode == 0 and not messages
        return
    assert result.returncode == 2 and len(messages) == 1, messages
    assert messages[0].startswith("prune_eval: error: unknown ") and "did you mean" in messages[0]


# ----------------------------------------------------------------------------------------------
# Keys that decide where results go cannot be swept (one directory per sweep)
OUTPUT_SWEEPS = {
    "name": ["name=a,b"],
    "hydra.sweep.dir": ["hydra.sweep.dir=runs/x,runs/y"],
    "hydra.sweep.subdir": ["hydra.sweep.subdir=x,y"],
    "hydra.run.dir": ["hydra.run.dir=x,y"],
    "hydra.output_subdir": ["hydra.output_subdir=.hx,.hy"],
    "hydra.launcher.submitit_folder": ["launch=slurm", "hydra.launcher.submitit_folder=x,y"],
    "an interpolation of a swept key": ["name=run${seed}", "seed=0,1"],
    "name, with a glob sweep (checked by the sweeper)": ["name=a,b", "method=glob(vani*)"],
    "an interpolation, with a glob sweep (checked by the sweeper)": ["name=run${seed}", "seed=0,1", "method=glob(vani*)"],
}


@pytest.mark.parametrize("case", sorted(OUTPUT_SWEEPS))
def test_a_sweep_over_where_results_go_is_refused_before_anything_runs(tmp_path, case) -> None:
    result = run_cli(["-m", "experiment=demo", *OUTPUT_SWEEPS[case]], tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prune_eval: error: "), lines
    if "interpolation" in case:
        assert "would write into 2 directories (outputs/run0, outputs/run1) through seed=0,1" in lines[0]
    else:
        key = OUTPUT_SWEEPS[case][-1 if "submitit" in case else 0].split("=")[0]
        assert f"sweeps over {key}, which decides" in lines[0] and "run one sweep per value" in lines[0]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "runs").exists()


def test_the_issue_command_with_two_names_exits_2_with_one_line(tmp_path) -> None:
    result = run_cli(["-m", "experiment=demo", "name=a,b"], tmp_path, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_output_dir_problem_names_the_overrides_that_move_the_directory() -> None:
    from prune_eval.overrides import output_dir_problem

    jobs = [["method=vanilla", "seed=0"], ["method=vanilla", "seed=1"], ["method=random", "seed=0"], ["method=random", "seed=1"]]
    assert output_dir_problem(jobs, ["outputs/d"] * 4, "outputs/d") is None
    message = output_dir_problem(jobs, ["outputs/s0", "outputs/s1", "outputs/s0", "outputs/s1"], "outputs/s0")
    assert "2 directories (outputs/s0, outputs/s1) through seed=0,1," in message and "method" not in message
    # every job agrees, but not with the sweep's own directory (a preset that sets name, chosen by a glob)
    assert "2 directories (outputs/default, outputs/demo)" in output_dir_problem(jobs, ["outputs/demo"] * 4, "outputs/default")


# ----------------------------------------------------------------------------------------------
# A group option applies to the swept choices that have it
def compose_choices(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from prune_eval.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_an_option_of_some_swept_choices_applies_to_those_and_the_plan_says_where_not() -> None:
    from prune_eval.overrides import applicable_jobs

    jobs = [["method=visionzip", "method.version=v1", "seed=0"], ["method=sparsevlm", "method.version=v1", "seed=0"],
            ["method=random", "++method.version=v2", "seed=1"], ["method=sparsevlm", "++method.version=v2", "seed=1"]]
    result = applicable_jobs(jobs, compose_choices)
    assert result.jobs == [["method=visionzip", "seed=0"], ["method=sparsevlm", "method.version=v1", "seed=0"],
                           ["method=random", "seed=1"], ["method=sparsevlm", "method.version=v2", "seed=1"]]
    assert result.left_out == {"method.version": ["method=visionzip", "method=random"]}
    assert result.notes() == ["method.version applies to method=sparsevlm only; left out of the jobs with method=visionzip and "
                              "method=random, which have no such option"]
    unchanged = [["method=visionzip", "method.dominant=54"], ["method=visionzip", "method.dominant=40"]]
    assert applicable_jobs(unchanged, compose_choices).jobs == unchanged and not applicable_jobs(unchanged, compose_choices).notes()


@pytest.mark.parametrize("option", ["method.versio=v1", "+method.versio=v1", "++method.versio=v1"])
def test_an_option_no_swept_choice_has_is_one_line_with_did_you_mean(option) -> None:
    from prune_eval.errors import PruneEvalError
    from prune_eval.overrides import applicable_jobs

    jobs = [["method=visionzip", option], ["method=sparsevlm", option]]
    with pytest.raises(PruneEvalError) as error:
        applicable_jobs(jobs, compose_choices)
    assert str(error.value).startswith("unknown key 'method.versio' for method 'visionzip' or 'sparsevlm'; did you mean 'method.version'?")
    assert "\n" not in str(error.value)


def test_adding_a_deeper_key_stays_hydras_business() -> None:
    """model.dims is an open set of the tiny model's sizes: adding one is allowed (tiny.build_config reads it)."""
    from prune_eval.overrides import applicable_jobs

    jobs = [["model=tiny", "+model.dims.text_kv_heads=2"]]
    assert applicable_jobs(jobs, compose_choices).jobs == jobs


def test_hydra_gets_a_partial_option_as_force_add_so_its_master_config_composes() -> None:
    from prune_eval.overrides import force_add_partial_options

    assert force_add_partial_options(["-m", "method=visionzip,sparsevlm", "method.version=v1", "seed=0,1", "budget=64"]) == \
        ["-m", "method=visionzip,sparsevlm", "++method.version=v1", "seed=0,1", "budget=64"]
    assert force_add_partial_options(["-m", "method=sparsevlm", "method.version=v1", "seed=0,1"]) == \
        ["-m", "method=sparsevlm", "method.version=v1", "seed=0,1"]
    assert force_add_partial_options(["-m", "experiment=demo,demo", "model.path=x"]) == ["-m", "experiment=demo,demo", "++model.path=x"]


@pytest.mark.slow
def test_the_readme_sweep_with_a_sparsevlm_option_runs_and_says_where_it_does_not_apply(tmp_path) -> None:
    result = run_cli(["-m", "experiment=demo", "method=vanilla,sparsevlm", "method.version=v1", "data.n_images=1",
                      "eval.max_new_tokens=2"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "method.version applies to method=sparsevlm only; left out of the jobs with method=vanilla" in result.stdout
    names = sorted(p.parent.name for p in (tmp_path / "outputs" / "demo").glob("*/summary.json"))
    assert [n.split("_")[0] for n in names] == ["sparsevlm-v1-64", "vanilla-576"]
