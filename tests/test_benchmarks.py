"""benchmarks/resident_sweep.py in its --tiny mode: the script's plumbing (sweeps through the real
CLI on fake GPU ids, figures read back from the cells' summaries, the targets' arithmetic), not the
GPU figures, which only the GPU run can give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resident_sweep_benchmark_runs_on_the_cpu(tmp_path) -> None:
    result = subprocess.run([sys.executable, "benchmarks/resident_sweep.py", "--tiny", "--tiny-images", "2", "--out", str(tmp_path),
                             "--sweep", "method=visionzip,random", "budget=64", "seed=0,1"],
                            cwd=REPO, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads((tmp_path / "resident_sweep.json").read_text())
    one, two = report["runs"]["1"], report["runs"]["2"]
    for run in (one, two):
        assert run["jobs"] == 4 and run["cells"] == 3  # VisionZip's two seeds are one cell
        assert run["unique_compute_s"] > 0 and run["loads"] == len(run["workers"])  # one load per worker
        assert sum(c["questions"] for c in run["per_cell"].values()) == 3 * 36
    assert len(one["workers"]) == 1 and 1 <= len(two["workers"]) <= 2
    targets = report["targets"]
    budget = one["unique_compute_s"] + one["load_s"] + one["compile_s"]
    assert targets["one_gpu"]["limit_s"] == round(1.2 * budget, 2) and targets["one_gpu"]["met"] == (one["wall_s"] <= 1.2 * budget)
    assert targets["two_gpus"]["ratio_to_one_gpu"] == round(two["wall_s"] / one["wall_s"], 3)


def test_weight_transfer_benchmark_says_what_it_needs(tmp_path) -> None:
    """benchmarks/weight_transfer.py needs a GPU (the copies it measures go to one): without one it
    says so in one line; the chunked copy it times is checked on the CPU in tests/test_transfer.py."""
    result = subprocess.run([sys.executable, "benchmarks/weight_transfer.py", "--checkpoint", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == "weight_transfer.py measures copies to a CUDA GPU; none is visible here"
