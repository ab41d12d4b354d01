"""Planning a sweep: seeds a method does not use share one cell (and say so), eval.fast=auto."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from prune_eval.config import CONF_DIR, plan_cell
from prune_eval.errors import PruneEvalError
from prune_eval.execution import sweep
from prune_eval.specs import EvalSpec

DESIGN_CARD = [[f"method={m}", "budget=64", f"seed={s}"] for m in ("visionzip", "sparsevlm") for s in range(5)]


def plan(jobs: list[list[str]]) -> list[sweep.PlannedCell]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return sweep.plan_jobs([["experiment=demo", *job] for job in jobs],
                               lambda overrides: compose(config_name="config", overrides=overrides))


def cell_of(method: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return plan_cell(compose(config_name="config", overrides=["experiment=demo", f"method={method}", *overrides]))


def test_the_design_card_sweep_is_six_computations_for_ten_jobs() -> None:
    planned = plan(DESIGN_CARD)
    cells: dict[str, list[sweep.PlannedCell]] = {}
    for cell in planned:
        cells.setdefault(cell.name.split("_")[0], []).append(cell)
    (visionzip,) = cells["visionzip-64"]
    assert visionzip.seed_free and visionzip.seeds == [0, 1, 2, 3, 4] and len(visionzip.aliases) == 4
    assert visionzip.spec.experiment["seed"] is None and "_anyseed_" in visionzip.name
    assert sorted(c.spec.experiment["seed"] for c in cells["sparsevlm-v1.5-64"]) == [0, 1, 2, 3, 4]  # DPC-kNN noise uses the seed
    assert len(planned) == 6


@pytest.mark.parametrize(("method", "overrides", "uses_seed"), [
    ("vanilla", [], False), ("visionzip", ["budget=64"], False), ("random", ["budget=64"], True),
    ("sparsevlm", ["budget=64", "method.version=v1"], True), ("sparsevlm", ["budget=64", "method.version=v1.5"], True),
    ("sparsevlm", ["budget=64", "method.version=v2"], False),  # v2 recycles nothing: no random numbers
])
def test_whether_a_cell_depends_on_the_seed_follows_the_resolved_method(method, overrides, uses_seed) -> None:
    a, b = cell_of(method, *overrides, "seed=0"), cell_of(method, *overrides, "seed=3")
    assert a.method.uses_seed is uses_seed and (a.name == b.name) is not uses_seed
    assert (a.experiment["seed"] is None) is not uses_seed


def test_plan_json_lists_every_requested_seed_and_the_closing_message_says_who_shares(tmp_path) -> None:
    sweep.record_plan(tmp_path, plan([["method=visionzip", "budget=64", f"seed={s}"] for s in (0, 1)]))
    planned = plan([["method=visionzip", "budget=64", f"seed={s}"] for s in (2, 3, 4)] + [["method=random", "budget=64", "seed=7"]])
    sweep.record_plan(tmp_path, planned)
    cells = json.loads((tmp_path / "plan.json").read_text())["cells"]
    (vz,) = [v for k, v in cells.items() if k.startswith("visionzip-64_anyseed")]
    assert vz["seeds"] == [0, 1, 2, 3, 4] and vz["uses_seed"] is False  # merged over both sweeps
    (rnd,) = [v for k, v in cells.items() if k.startswith("random-64_seed7")]
    assert rnd["seeds"] == [7] and rnd["uses_seed"] is True
    message, complete = sweep.describe_outcome(tmp_path, planned, 0)
    assert "visionzip-64 does not use the seed: one computation serves seeds 2–4 (visionzip-64_anyseed_" in message
    assert "random" not in message.split("does not use")[0].splitlines()[-1] and not complete


def test_seed_ranges() -> None:
    assert sweep.seed_ranges([4, 0, 1, 2, 3]) == "0–4"
    assert sweep.seed_ranges([0, 2, 3, 7, 9, 8]) == "0, 2–3, 7–9"
    assert sweep.seed_ranges([5]) == "5"


def test_eval_fast_auto_means_the_fast_path_on_cuda_only() -> None:
    auto = EvalSpec(fast="auto")
    assert auto.fast_on("cuda") and not auto.fast_on("cpu")
    assert EvalSpec(fast=False).fast_on("cuda") is False and EvalSpec(fast=True).fast_on("cpu") is True
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert compose(config_name="config").eval.fast == "auto"  # the default
    assert cell_of("vanilla").eval.fast is True  # experiment=demo's own choice (the CPU demo runs the fast path)
    with pytest.raises(PruneEvalError, match=r"eval.fast=sometimes; allowed: true, false, auto"):
        cell_of("vanilla", "eval.fast=sometimes")
    with pytest.raises(PruneEvalError, match=r"eval.compile=auto; allowed: true, false$"):
        cell_of("vanilla", "eval.compile=auto")
