"""Shared fixtures: paths to the real POPE files in ../shared, the tiny model, a runner for the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNE_EVAL_SHARED", REPO.parent / "shared"))
POPE = SHARED / "data" / "pope"
REFERENCE_ANSWERS = POPE / "reference-answers" / "llava-v1.5-13b.jsonl"


def pytest_configure(config) -> None:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def pope_dir() -> Path:
    if not (POPE / "llava-1.5" / "coco_pope_random.json").is_file():
        pytest.fail(f"the real POPE files are expected in {POPE} (../shared/data/pope beside the repo)")
    return POPE


def tiny_model_cfg(**dims):
    return OmegaConf.create({"name": "tiny", "source": "tiny", "init_seed": 0, "tokenization": "hf", "dims": dims})


@pytest.fixture(scope="session")
def tiny_bundle():
    from prune_eval.models import loading

    return loading.load(tiny_model_cfg(), dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def fresh_resident_model():
    """Each test loads its own model: run_cell keeps the last model it loaded in this process
    (prune_eval.execution.resident), which would carry one test's (patched) model into the next."""
    yield
    resident = sys.modules.get("prune_eval.execution.resident")
    if resident is not None:
        resident.PROCESS_MODELS.release()


def run_cli(args: list[str], cwd: Path, *, module: str = "prune_eval", timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` in `cwd`; returns the completed process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


# Overrides that keep an end-to-end sweep on the tiny random model within seconds on a CPU.
FAST_DEMO = ["experiment=demo", "data.n_images=3", "eval.max_new_tokens=3", "eval.batch_size=6", "eval.part_size=6"]
