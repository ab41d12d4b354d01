"""Several processes answering one cell, shard by shard (prune_eval.execution.cell).

Two real processes run the same cell at once (as two local-gpus workers do when one helps the
other): each question is answered exactly once, the records equal a single process's, one of them
writes the summary. A helper killed half-way through a shard leaves that shard to the other, which
answers what is missing before it writes the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_DEMO
from hydra import compose, initialize_config_dir

from prune_eval.config import CONF_DIR, plan_cell
from prune_eval.data.synthetic import make_questions
from prune_eval.execution import events, faults, records
from prune_eval.execution.cell import run_cell, shard_questions

CELL = [*FAST_DEMO, "data.n_images=4", "eval.shard_images=1", "method=random", "budget=64"]  # 4 shards of 18 questions
# Both processes import everything, wait for each other (a start barrier of files next to the cell),
# then answer at 0.1 s a batch at least: without that, the first could finish the toy's 72 questions
# before the second has imported torch, and there would be nothing to share.
RUN = """
import logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from hydra import compose, initialize_config_dir
from prune_eval.config import CONF_DIR
from prune_eval.execution import faults
from prune_eval.execution.cell import run_cell
checkpoint = faults.checkpoint
def slow_checkpoint(point, path=None):
    if point == "batch":
        time.sleep(0.1)
    checkpoint(point, path)
faults.checkpoint = slow_checkpoint
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose(config_name="config", overrides=sys.argv[2:])
barrier = Path(sys.argv[1]).parent
barrier.mkdir(parents=True, exist_ok=True)
(barrier / f"ready-{os.getpid()}").touch()
while len(list(barrier.glob("ready-*"))) < 2:
    time.sleep(0.01)
print("status", run_cell(cfg, sys.argv[1]), flush=True)
"""


def test_shards_are_image_blocks_in_order_of_first_appearance() -> None:
    questions = make_questions(5, seed=0)
    shards = shard_questions(questions, 2)
    images = list(dict.fromkeys(q.image for q in questions))
    assert [sorted({q.image for q in s}) for s in shards] == [sorted(images[0:2]), sorted(images[2:4]), images[4:5]]
    assert sorted(q.key for s in shards for q in s) == sorted(q.key for q in questions)
    assert [q.key for q in shards[0]] == [q.key for q in questions if q.image in images[0:2]]  # the data set's order


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, dict]:
    """The cell computed by one process alone: (its name, its records by key)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=CELL)
    cell = tmp_path_factory.mktemp("reference") / plan_cell(cfg).name
    assert run_cell(cfg, cell) == "complete"
    return cell.name, {r["key"]: r for r in records.read_records(cell).records}


def start(cell: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(cell), *CELL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def check_records(cell: Path, expected: dict) -> None:
    read = records.read_records(cell)
    assert not read.bad_parts and not read.conflicts
    lines = sum(len(records.read_part(p)) for p in records.part_paths(cell))
    assert lines == len(read.records) == len(expected), "a question answered twice, or one missing"
    assert {r["key"]: r for r in read.records} == expected  # the same answers as one process alone


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_share_a_cell_and_answer_each_question_once(tmp_path, reference) -> None:
    name, expected = reference
    cell = tmp_path / "shared" / name
    a, b = start(cell), start(cell)
    outputs = [p.communicate(timeout=500)[0] for p in (a, b)]
    statuses = sorted(next(line.split()[1] for line in out.splitlines() if line.startswith("status ")) for out in outputs)
    # the last to finish writes the summary; the other either left first ("shared") or found the summary
    # already written when it took the cell back ("complete"): both are right, but only one writes it
    assert statuses in (["complete", "shared"], ["complete", "complete"]), outputs
    assert sum("complete: mean F1" in out for out in outputs) == 1, outputs
    assert "another process is answering it; helping" in "".join(outputs)
    check_records(cell, expected)
    assert all("-s000" in p.name for p in records.part_paths(cell))  # each shard's parts carry its number
    timing = json.loads((cell / "summary.json").read_text())["timing"]
    assert timing["questions_computed"] == len(expected) and len(timing["workers"]) == 2 and timing["shards"] == 4
    computed = [e for e in events.read_events(cell) if e["event"] == "computed"]
    assert sorted(e["shard"] for e in computed) == [0, 1, 2, 3] and len({e["pid"] for e in computed}) == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_helper_killed_mid_shard_leaves_its_shard_to_the_other(tmp_path, reference) -> None:
    name, expected = reference
    cell = tmp_path / "killed" / name
    a, b = start(cell), start(cell, {faults.KILL_AT: "batch:4"})  # b dies in its second shard (3 batches of 6 per shard)
    out_a, _ = a.communicate(timeout=500)
    b.communicate(timeout=500)
    assert b.returncode == -9 and "status complete" in out_a, out_a
    check_records(cell, expected)
    computed = [e for e in events.read_events(cell) if e["event"] == "computed"]
    assert len({e["pid"] for e in computed}) == 2 and sum(e["questions"] for e in computed) <= len(expected)
