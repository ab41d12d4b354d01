"""End-to-end sweeps through the real CLI and Hydra: records, resume, kill -9, failures, sharing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_DEMO, FASTPATH_DEMO, run_cli
from PIL import Image

from prune_eval.execution import records
from prune_eval.execution.cell import cell_status
from prune_eval.methods import sparsevlm

pytestmark = pytest.mark.slow


def cells(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if (p / "cell.json").exists())


def all_records(sweep_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for cell in cells(sweep_dir):
        read = records.read_records(cell)
        assert not read.bad_parts and not read.conflicts
        out[cell.name] = sorted(read.records, key=lambda r: r["key"])
    return out


def test_demo_sweep_writes_records_for_every_cell_and_resumes(tmp_path) -> None:
    result = run_cli(["-m", *FAST_DEMO, "method=random", "budget=64", "seed=0,1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "demo"
    assert f"sweep {Path('outputs/demo')}" in result.stdout and "records: outputs/demo/<cell>/records/" in result.stdout
    found = cells(sweep)
    assert len(found) == 2
    for cell in found:
        summary = json.loads((cell / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["n_questions"] == 3 * 3 * 6
        assert summary["data"]["format"] == "synthetic" and summary["model"]["source"] == "toy"
        assert summary["environment"]["versions"]["torch"] and "git" in summary["environment"]
        assert {r["visual_tokens"] for r in records.read_records(cell).records} == {64}
    plan = json.loads((sweep / "plan.json").read_text())
    assert sorted(plan["cells"]) == [c.name for c in found]
    again = run_cli(["-m", *FAST_DEMO, "method=random", "budget=64", "seed=0,1"], tmp_path)
    assert again.returncode == 0 and "2 were already complete" in again.stdout


def test_equivalent_jobs_share_one_cell(tmp_path) -> None:
    result = run_cli(["-m", *FASTPATH_DEMO, "method=vanilla", "budget=64,128"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(cells(tmp_path / "outputs" / "demo")) == 1
    assert "1 job(s) shared a cell with an equivalent configuration" in result.stdout


def wait_for_part(sweep: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for cell in sweep.glob("*/records"):
            if records.part_paths(cell.parent) and not (cell.parent / "summary.json").exists():
                return cell.parent
        if process.poll() is not None:
            raise AssertionError("the sweep ended before it could be killed")
        time.sleep(0.02)
    raise AssertionError("no record part appeared")


def test_sigkill_mid_sweep_then_rerun_gives_identical_records(tmp_path) -> None:
    args = ["-m", *FAST_DEMO, "method=random", "budget=64", "seed=0,1", "eval.part_size=6", "eval.batch_size=6"]
    reference = run_cli([*args, "name=reference"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "prune_eval", *args, "name=killed"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        partial_cell = wait_for_part(tmp_path / "outputs" / "killed", process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert cell_status(partial_cell) == "partial"
    answered_before = len(records.read_records(partial_cell).records)
    rerun = run_cli([*args, "name=killed"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    expected, got = all_records(tmp_path / "outputs" / "reference"), all_records(tmp_path / "outputs" / "killed")
    assert expected == got
    assert 0 < answered_before < len(got[partial_cell.name])
    assert all(len(rs) == len({r["key"] for r in rs}) == 54 for rs in got.values())


def write_mini_pope(folder: Path, image_dir: Path) -> None:
    """Two splits with two images each; one image of the popular split is not a decodable file."""
    folder.mkdir()
    image_dir.mkdir()
    for split in ("adversarial", "popular", "random"):
        rows = []
        for i, image in enumerate([f"{split}_a.jpg", f"{split}_b.jpg"]):
            for j, (obj, label) in enumerate([("red circle", "yes"), ("blue square", "no")]):
                rows.append({"question_id": 2 * i + j + 1, "image": image, "text": f"Is there a {obj} in the image?", "label": label})
            if split == "popular" and i == 1:
                (image_dir / image).write_bytes(b"not a jpeg")
            else:
                Image.new("RGB", (400, 300), (200, 30 * i, 40)).save(image_dir / image)
        (folder / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_failing_cell_records_its_error_and_the_others_go_on(tmp_path) -> None:
    write_mini_pope(tmp_path / "pope", tmp_path / "images")
    fast = [a for a in FAST_DEMO if not a.startswith("data.")]
    result = run_cli(["-m", *fast, "data=pope", f"data.question_dir={tmp_path / 'pope'}", f"data.image_dir={tmp_path / 'images'}",
                      "data.allow_unknown_version=true", "data.splits=[random],[popular]"], tmp_path)
    assert result.returncode == 1
    statuses = {c.name: cell_status(c) for c in cells(tmp_path / "outputs" / "demo")}
    assert sorted(statuses.values()) == ["complete", "failed"]
    failed = next(c for c in cells(tmp_path / "outputs" / "demo") if statuses[c.name] == "failed")
    error = json.loads((failed / "error.json").read_text())
    assert "popular_b.jpg cannot be decoded" in error["message"] and "Traceback" in error["traceback"]
    assert "failed:" in result.stdout and "cannot be decoded" in result.stdout


def test_method_sweep_seeds_and_shared_cells(tmp_path) -> None:
    """Random uses the seed, VisionZip and vanilla do not (one cell serves both seeds), vanilla ignores
    the budget; the 7 cells of 12 jobs load the model once (launch=local: one resident model)."""
    result = run_cli(["-m", *FASTPATH_DEMO, "method=vanilla,visionzip,random", "budget=64,128", "seed=0,1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "demo"
    found = {c.name: c for c in cells(sweep)}
    assert len(found) == 1 + 2 + 4  # 12 jobs: vanilla is one cell, VisionZip one per budget, random one per budget and seed
    assert "5 job(s) shared a cell" in result.stdout
    for tokens in (64, 128):
        assert f"visionzip-{tokens} does not use the seed: one computation serves seeds 0–1 (visionzip-{tokens}_anyseed_" in result.stdout
    assert "vanilla-576 does not use the seed: one computation serves seeds 0–1" in result.stdout
    summaries = {n: json.loads((c / "summary.json").read_text()) for n, c in found.items()}
    assert sum(s["timing"]["loads"] for s in summaries.values()) == 1  # counted, not timed
    assert all(s["timing"]["questions_computed"] == s["n_questions"] for s in summaries.values())  # each computed once
    plan = json.loads((sweep / "plan.json").read_text())["cells"]
    assert all(plan[n]["seeds"] == [0, 1] and plan[n]["uses_seed"] is False for n in found if "_anyseed_" in n)
    assert "report: " in result.stdout  # the report reads cells whose seed is null

    def answers(prefix: str, seed: int | None) -> list[str]:
        tag = "anyseed" if seed is None else f"seed{seed}"
        (cell,) = [c for n, c in found.items() if n.startswith(f"{prefix}_{tag}_")]
        rows = sorted(records.read_records(cell).records, key=lambda r: r["key"])
        return [r["raw_answer"] for r in rows], {r["visual_tokens"] for r in rows}

    assert answers("visionzip-64", None)[1] == {64} and answers("visionzip-128", None)[1] == {128}
    assert answers("random-64", 0)[0] != answers("random-64", 1)[0]
    assert answers("vanilla-576", None)[1] == {576}
    summary = summaries[next(n for n in found if n.startswith("visionzip-64_anyseed"))]
    assert summary["experiment"]["seed"] is None and summary["method"]["uses_seed"] is False
    assert summary["method"]["params"] | {} == {"visual_tokens": 64, "dominant": 54, "contextual": 10, "vision_layer": -2,
                                                 "split_rule": "published (VisionZip README / paper appendix B.1)"}


def test_sparsevlm_versions_sweep(tmp_path) -> None:
    result = run_cli(["-m", *FASTPATH_DEMO, "method=sparsevlm", "method.version=v1,v1.5,v2", "budget=64,128"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = cells(tmp_path / "outputs" / "demo")
    assert len(found) == 6
    for cell in found:
        summary = json.loads((cell / "summary.json").read_text())
        params, compute = summary["method"]["params"], summary["compute"]
        assert params["version"] in ("v1", "v1.5", "v2") and params["layers"]
        assert ("schedule" in params) != (params["version"] == "v1")
        assert compute["entering"] == 576 and compute["input_seen"] < 576 and compute["official_equal_tokens"] < 576
        assert len(compute["per_layer_mean"]) == 6  # the toy's 6 LLM layers (SparseVLM's layers scaled onto them)
        assert params["layer_rule"] == "scaled" and params["layers"] == [layer * 6 // 32 for layer in sparsevlm.VERSIONS[params["version"]].layers]
