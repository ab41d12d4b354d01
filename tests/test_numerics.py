"""Numerics are part of a record (issue 19.2).

- The configured numerics (evaluation path, that path's batch composition, compile) are part of the
  cell's identity: a sweep over them gives different cells, which the report pairs as numerics-only
  comparisons (its numerical floor).
- Every record part's footer carries the runtime numerics it was computed under; a resumed cell
  refuses in one line to mix parts computed differently, unless eval.allow_mixed_numerics=true,
  which summary.json records.
- Readers accept schema-1 parts (no numerics) as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST_DEMO, run_cli
from hydra import compose, initialize_config_dir

from prune_eval.execution import records
from prune_eval.analysis import analyse
from prune_eval.config import CONF_DIR, numerics_identity, plan_cell

RUNTIME_KEYS = {"path", "device_type", "device_name", "dtype", "attention_kernels", "compile", "torch", "transformers"}


def planned(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return plan_cell(compose(config_name="config", overrides=["experiment=demo", *overrides]))


def test_configured_numerics_name_the_cell() -> None:
    reference, fast = planned("eval.fast=false"), planned("eval.fast=true")
    assert reference.experiment["numerics"] == {"fast": False, "compile": False, "shard_images": 64, "batch_size": 8}
    assert fast.experiment["numerics"] == {"fast": True, "compile": False, "shard_images": 64, "batch_images": 64, "batch_tokens": 32768}
    names = {reference.name, fast.name, planned("eval.fast=false", "eval.batch_size=4").name, planned("eval.fast=true", "eval.batch_images=2").name}
    assert len(names) == 4
    # a batch setting of the other path does not define the result: same cell
    assert planned("eval.fast=true", "eval.batch_size=3").name == fast.name
    # the opt-in for mixing on resume is not part of the identity
    assert planned("eval.fast=false", "eval.allow_mixed_numerics=true").name == reference.name
    assert numerics_identity({"fast": "auto", "batch_size": 2, "batch_images": 3, "batch_tokens": 4}) == {
        "fast": "auto", "compile": False, "shard_images": 64, "batch_size": 2, "batch_images": 3, "batch_tokens": 4}
    # batches never cross a shard: the shard size is part of the batch composition
    assert planned("eval.fast=false", "eval.shard_images=2").name != reference.name


def test_schema_1_parts_are_still_read(tmp_path) -> None:
    row = {"schema_version": 1, "key": "random/1", "split": "random", "question_id": 1, "image": "a.jpg", "label": "yes",
           "question": "Is there a cat?", "raw_answer": "Yes", "pred_llava": "yes", "pred_exact": "yes",
           "visual_tokens": 576, "new_tokens": 1, "stop_reason": "eos"}
    body = (json.dumps(row, sort_keys=True) + "\n").encode()
    import hashlib

    footer = {"_footer": {"count": 1, "sha256": hashlib.sha256(body).hexdigest(), "schema_version": 1}}
    part = records.records_dir(tmp_path) / "part-00000.jsonl"
    part.parent.mkdir(parents=True)
    part.write_bytes(body + (json.dumps(footer) + "\n").encode())
    read = records.read_records(tmp_path)
    assert not read.bad_parts and read.records == [row] and read.numerics == {"part-00000.jsonl": None}
    # and a new part carries its numerics
    records.write_part(tmp_path, [{**row, "schema_version": records.SCHEMA_VERSION, "key": "random/2", "question_id": 2}],
                       {"path": "fast"})
    assert records.read_records(tmp_path).numerics == {"part-00000.jsonl": None, "part-00001.jsonl": {"path": "fast"}}


def cell_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / "cell.json").exists())


@pytest.mark.slow
def test_parts_record_runtime_numerics_and_resume_refuses_to_mix(tmp_path) -> None:
    args = ["-m", *FAST_DEMO, "method=vanilla", "hydra.sweeper.report=false"]
    done = run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (cell,) = cell_dirs(tmp_path / "outputs" / "demo")
    parts = records.part_paths(cell)
    footers = [records.read_part_and_footer(p)[1] for p in parts]
    assert len(parts) == 9 and all(set(f["numerics"]) == RUNTIME_KEYS for f in footers)
    numerics = footers[0]["numerics"]
    assert numerics["path"] == "reference" and numerics["device_type"] == "cpu" and numerics["dtype"] == "float32"
    assert numerics["attention_kernels"] == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
    summary = json.loads((cell / "summary.json").read_text())
    # eval.fast=auto (the default): both paths' batch settings name the cell; on the CPU it ran the reference path
    assert summary["numerics"] == {"configured": {"fast": "auto", "compile": False, "shard_images": 64, "batch_size": 6,
                                                  "batch_images": 64, "batch_tokens": 32768},
                                   "runtime": [{"numerics": numerics, "parts": [p.name for p in parts]}],
                                   "mixed": False, "allow_mixed": False}

    # as if the first parts had been computed on a GPU: the rerun must not add CPU parts to them
    (cell / "summary.json").unlink()
    parts[-1].unlink()
    elsewhere = {**numerics, "device_type": "cuda", "device_name": "NVIDIA H200", "dtype": "float16"}
    for part in parts[:-1]:
        rows = records.read_part(part)
        part.write_bytes(records.encode_part(rows, elsewhere))
    again = run_cli(args, tmp_path)
    assert again.returncode == 1
    error = json.loads((cell / "error.json").read_text())["message"]
    assert error.startswith(f"{cell.name}: 8 record part(s) were computed under other numerics (part-00000.jsonl: "
                            f"device_name: {numerics['device_name']} here, NVIDIA H200 there; device_type: cpu here, cuda there; "
                            "dtype: float32 here, float16 there); resuming would mix them in one cell")
    assert error.endswith("or set eval.allow_mixed_numerics=true (recorded in summary.json)")
    assert len(error.splitlines()) == 1 and len(records.part_paths(cell)) == 8  # nothing was added

    allowed = run_cli([*args, "eval.allow_mixed_numerics=true"], tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["numerics"]["mixed"] and summary["numerics"]["allow_mixed"]
    assert [len(g["parts"]) for g in summary["numerics"]["runtime"]] == [8, 1]
    assert analyse.analyse(tmp_path / "outputs" / "demo", n_resamples=100).entries[0].status == "complete"


@pytest.mark.slow
def test_a_sweep_over_numerics_gives_numerics_only_comparisons(tmp_path) -> None:
    done = run_cli(["-m", *FAST_DEMO, "method=visionzip", "budget=64", "eval.batch_size=2,6", "hydra.sweeper.report=false"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    a = analyse.analyse(tmp_path / "outputs" / "demo", n_resamples=200)
    (c,) = a.comparisons
    assert c.pair.factor == "numerics" and c.pair.numerics_only and c.pair.differs_in == "numerics: batch_size"
    assert a.family.factors == {"numerics"}  # swept on the command line: the user asked about it
    (floor,) = a.floors.values() if len(a.floors) == 1 else list(a.floors.values())[:1]
    assert floor.answers == c.n_differ and floor.points == pytest.approx(abs(100 * c.bootstrap.estimate))
