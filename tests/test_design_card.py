"""The command prune_eval is named by runs as written: on the toy, and without weights or data (then
every missing input is said once, with the command that fetches it, before anything runs)."""

from __future__ import annotations

import re

import json
from pathlib import Path

import pytest
from conftest import POPE, run_cli

DESIGN_CARD = ["-m", "method=visionzip,sparsevlm", "seed=0,1,2,3,4"]
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def offline(tmp_path: Path) -> dict[str, str]:
    return {**OFFLINE, "HF_HOME": str(tmp_path / "empty-hf-home")}


def complete_cells(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


@pytest.mark.slow
def test_the_design_card_command_runs_on_the_toy_as_written(tmp_path) -> None:
    result = run_cli([*DESIGN_CARD, "experiment=demo"], tmp_path, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    cells = complete_cells(tmp_path / "outputs" / "demo")
    assert sorted({re.split("_seed|_anyseed", name)[0] for name in cells}) == ["sparsevlm-v1.5-64", "visionzip-64"]
    # VisionZip draws no random numbers: one cell serves seeds 0-4; SparseVLM v1.5's recycling noise is seeded
    assert len(cells) == 6 and all(s["n_questions"] == 24 * 3 * 6 for s in cells.values())
    assert sum("_anyseed_" in name for name in cells) == 1
    assert (tmp_path / "outputs" / "demo" / "report" / "report.md").is_file()


def test_the_design_card_command_on_a_small_toy_sweep(tmp_path) -> None:
    """The same command, cheaper (one seed, one image, short answers): the default budget is one
    both methods have a schedule for."""
    result = run_cli(["-m", "method=visionzip,sparsevlm", "seed=0", "experiment=demo", "data.n_images=1",
                      "eval.max_new_tokens=3"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    cells = complete_cells(tmp_path / "outputs" / "demo")
    assert sorted(re.split("_seed|_anyseed", name)[0] for name in cells) == ["sparsevlm-v1.5-64", "visionzip-64"]
    for summary in cells.values():
        assert summary["config"]["budget"] == 64
        params = summary["method"]["params"]
        assert params.get("budget", params.get("visual_tokens")) == 64  # SparseVLM's nominal budget; VisionZip's tokens


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_the_design_card_command_without_weights_or_data_says_each_missing_input_once(tmp_path) -> None:
    result = run_cli(DESIGN_CARD, tmp_path, env=offline(tmp_path), timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 3 and len(set(lines)) == 3, lines
    weights, questions, images = lines
    assert weights.startswith("prune_eval: error: weights for llava-hf/llava-1.5-7b-hf are not in the Hugging Face cache")
    assert "`python -m prune_eval.assets weights --model llava-1.5-7b`" in weights
    assert "missing POPE question file(s): data/pope/llava-1.5/coco_pope_adversarial.json" in questions
    assert "`python -m prune_eval.assets pope-questions --version llava-1.5`" in questions
    assert "500 of 500 POPE images missing in data.image_dir=data/coco/val2014, e.g. data/coco/val2014/COCO_val2014_" in images
    assert "`python -m prune_eval.assets pope-images`" in images
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs").exists()


def test_a_single_run_without_weights_or_data_says_each_missing_input_once(tmp_path) -> None:
    result = run_cli([], tmp_path, env=offline(tmp_path), timeout=300)
    assert result.returncode == 2
    lines = error_lines(result)
    assert [line.split(";")[0].split(" ")[2:4] for line in lines] == [["weights", "for"], ["missing", "POPE"], ["500", "of"]], lines


def test_missing_data_is_said_once_and_the_sweeps_other_mistakes_too(tmp_path) -> None:
    """Weights present (the toy), question files and images elsewhere: the data lines once each,
    naming the folders given, and the jobs are still validated (budget=1000 is refused now, not later)."""
    images = tmp_path / "coco"
    images.mkdir()
    result = run_cli(["-m", "model=toy", "quant=fp32", "device=cpu", "method=visionzip,sparsevlm", "budget=64,1000", "seed=0,1",
                      f"data.question_dir={tmp_path / 'pope'}", f"data.image_dir={images}"], tmp_path, env=offline(tmp_path), timeout=300)
    assert result.returncode == 2
    lines = error_lines(result)
    assert lines[0].startswith(f"prune_eval: error: missing POPE question file(s): {tmp_path / 'pope'}/coco_pope_adversarial.json")
    assert f"`python -m prune_eval.assets pope-questions --version llava-1.5 --out {tmp_path / 'pope'}`" in lines[0]
    assert lines[1].startswith(f"prune_eval: error: 500 of 500 POPE images missing in data.image_dir={images}")
    assert f"`python -m prune_eval.assets pope-images --out {images}`" in lines[1]
    assert lines[2] == "prune_eval: error: 4 of 8 job(s) are invalid; nothing was launched:"
    assert len(lines) == 7 and all("budget=1000 is larger than the 576 visual tokens" in line for line in lines[3:])


def test_images_are_counted_from_the_question_files_when_they_are_there(tmp_path) -> None:
    images = tmp_path / "coco"
    images.mkdir()
    (images / "COCO_val2014_000000310196.jpg").write_bytes(b"")  # present (its content is checked later, by the cell)
    result = run_cli(["model=toy", "quant=fp32", "device=cpu", f"data.question_dir={POPE}/llava-1.5", f"data.image_dir={images}"],
                     tmp_path, env=offline(tmp_path), timeout=300)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert f"499 of 500 POPE images missing in data.image_dir={images}" in line
