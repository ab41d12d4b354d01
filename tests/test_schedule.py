"""Scheduling policies (prune_eval.execution.schedule): costs, one worker's order, SLURM task packing."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir

from prune_eval.config import CONF_DIR, plan_cell
from prune_eval.execution import schedule
from prune_eval.execution.schedule import CellJob


def spec(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return plan_cell(compose(config_name="config", overrides=["experiment=demo", *overrides]))


def test_costs_follow_the_measured_ratios() -> None:
    """SparseVLM@64 costs 5x vanilla per question, VisionZip@64 0.4 + 0.6 * 64/576 of it, the
    reference path 10x the fast path (BENCHMARKS.md); a larger LLM costs more in proportion."""
    vanilla = schedule.seconds_per_question(spec("method=vanilla", "eval.fast=true"))
    visionzip = schedule.seconds_per_question(spec("method=visionzip", "budget=64", "eval.fast=true"))
    sparsevlm = schedule.seconds_per_question(spec("method=sparsevlm", "budget=64", "eval.fast=true"))
    reference = schedule.seconds_per_question(spec("method=vanilla", "eval.fast=false"))
    assert visionzip / vanilla == pytest.approx(0.4 + 0.6 * 64 / 576)
    assert sparsevlm / vanilla == pytest.approx(5.0) and reference / vanilla == pytest.approx(10.0)
    toy = spec("method=vanilla")
    scale = toy.geometry.text_layers * toy.geometry.text_hidden**2 / (32 * 4096**2)
    assert vanilla == pytest.approx(14.0 / 8910 * scale)
    job = schedule.cell_job(spec("method=visionzip", "budget=64", "data.n_images=5", "eval.shard_images=2"), ["x=1"], "/tmp/c", 3)
    assert (job.n_questions, job.shards, job.job_num, job.overrides) == (5 * 18, 3, 3, ("x=1",))


def jobs(*cells: tuple[str, float, str]) -> list[CellJob]:
    return [CellJob(name, (), f"/tmp/{name}", i, model, cost, 100, 1, ready_s=10.0) for i, (name, cost, model) in enumerate(cells)]


def test_one_worker_runs_each_model_group_back_to_back_longest_first() -> None:
    order = schedule.order_for_one_worker(jobs(("a1", 5, "A"), ("b1", 50, "B"), ("a2", 30, "A"), ("b2", 1, "B"), ("a3", 40, "A")))
    assert [j.name for j in order] == ["a3", "a2", "a1", "b1", "b2"]  # group A has more work (75 vs 51)


def test_tasks_are_balanced_and_keep_a_model_together() -> None:
    cells = jobs(("s1", 70, "A"), ("s2", 70, "A"), ("s3", 70, "A"), ("s4", 70, "A"), ("s5", 70, "A"), ("v", 8, "A"))
    tasks = schedule.pack_tasks(cells, 2)
    work = sorted(sum(j.cost for j in task) for task in tasks)
    assert [len(t) for t in tasks] == [3, 3] and work == [148, 210]  # longest first onto the least-loaded task
    mixed = jobs(("a1", 30, "A"), ("b1", 30, "B"), ("a2", 29, "A"), ("b2", 29, "B"))
    packed = schedule.pack_tasks(mixed, 2)
    assert sorted({j.model_key for j in task} == {task[0].model_key} for task in packed) == [True, True]  # one load per task
    for task in packed:
        costs = [j.cost for j in task]
        assert costs == sorted(costs, reverse=True)


def test_cells_per_task_auto_stops_where_a_task_would_compute_less_than_it_starts() -> None:
    many = jobs(*[(f"c{i}", 50, "A") for i in range(10)])  # 500 s of work, 10 s to get ready
    assert schedule.task_count(many, "auto", array_parallelism=64) == 10
    assert schedule.task_count(many, "auto", array_parallelism=4) == 4
    tiny = jobs(*[(f"c{i}", 2, "A") for i in range(10)])  # 20 s of work: two tasks of 10 s
    assert schedule.task_count(tiny, "auto", array_parallelism=64) == 2
    assert schedule.task_count(many, 3, array_parallelism=64) == math.ceil(10 / 3)
    assert [len(t) for t in schedule.pack_tasks(many, 4)] == [3, 3, 2, 2]
