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
# The demo, small. eval.fast=auto (the default; experiment=demo sets true) runs the reference path on
# the CPU: batches of eval.batch_size questions, the boundaries the resume, kill and integrity tests use.
FAST_DEMO = ["experiment=demo", "data.n_images=3", "eval.max_new_tokens=3", "eval.batch_size=6", "eval.part_size=6", "eval.fast=auto"]
# The same on the fast path (experiment=demo's own choice), for tests that do not need those boundaries.
FASTPATH_DEMO = [*FAST_DEMO[:-1], "eval.fast=true"]


# ------------------------------------------------------------------ the fast path against the reference path
REFERENCE_BATCH = 5  # rows per reference-path batch in answers_by_key


def answers_by_key(path, bundle, method_name, options, budget, questions, answered=frozenset(), method=None, decode_all=False):
    """Run `path` (engine.evaluate_reference or fast.evaluate_fast) on synthetic images: {question
    key: Answer}. Reference rows in batches of 5, fast batches of 2 images; 4 new tokens at most;
    `decode_all`: every question decodes all 4 (no early stop)."""
    from prune_eval.data import images
    from prune_eval.execution.engine import EvalSettings
    from prune_eval.execution.fast import evaluate_fast
    from prune_eval.methods import get_method

    method = method or get_method(method_name)
    params = method.resolve(options, budget, bundle.geometry)
    if path is evaluate_fast:
        settings = EvalSettings(batch_size=2, max_new_tokens=4, stop_when_decided=not decode_all, fast=True, batch_images=2, batch_tokens=4096)
    else:
        settings = EvalSettings(batch_size=REFERENCE_BATCH, max_new_tokens=4, stop_when_decided=not decode_all, fast=False)
    answers = []
    path(bundle, method, params, questions, images.synthetic_loader(), preprocess="pad", settings=settings, seed=3,
         on_answers=answers.extend, answered=answered)
    return {a.question.key: a for a in answers}


@pytest.fixture(scope="session")
def toy_bundle():
    """The shipped toy LLaVA (6 text layers), fp32 on the CPU."""
    from prune_eval.models import loading

    cfg = OmegaConf.create({"name": "toy", "source": "toy", "path": None, "tokenization": "hf"})
    return loading.load(cfg, dtype=torch.float32, device=torch.device("cpu"))


def varied_questions():
    """Two images; questions of three lengths; a prompt asked twice (another split); the second
    image has fewer questions than the first (padded question slots)."""
    import dataclasses

    from prune_eval.data import synthetic

    questions = synthetic.make_questions(2, seed=4)
    by_key = {q.key: q for q in questions}
    chosen = [by_key[f"adversarial/{i}"] for i in range(1, 12)] + [by_key["popular/2"], by_key["random/7"]]
    longer = {"adversarial/3": "in this image in the image?", "adversarial/9": "in this image?"}
    chosen = [dataclasses.replace(q, prompt=q.prompt.replace("in the image?", longer[q.key])) if q.key in longer else q for q in chosen]
    assert len({(q.image, q.prompt) for q in chosen}) == len(chosen) - 2
    return chosen


def recorded_kept_sets(monkeypatch, method):
    """Capture the hooks the reference path creates and the question blocks the fast path creates;
    returns the method to run and the two recorders (both have `kept_sets()`)."""
    import dataclasses

    from prune_eval.execution import fast

    reference_hooks, blocks = [], []

    def make_hook(*args, **kwargs):
        reference_hooks.append(method.make_hook(*args, **kwargs))
        return reference_hooks[-1]

    class Recorded(fast.QuestionBlocks):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            blocks.append(self)

    monkeypatch.setattr(fast, "QuestionBlocks", Recorded)
    return dataclasses.replace(method, make_hook=make_hook), reference_hooks, blocks


def assert_same_answers(fast_answers, reference_answers) -> None:
    """{question key: Answer} of the two paths: the same keys, tokens, stop reasons, visual tokens
    per layer and prompt lengths, first-token logits within 1e-5."""
    assert fast_answers.keys() == reference_answers.keys()
    for key, expected in reference_answers.items():
        got = fast_answers[key]
        assert got.generation.token_ids == expected.generation.token_ids, key
        assert got.generation.stop_reason == expected.generation.stop_reason
        assert got.generation.visual_per_layer == expected.generation.visual_per_layer
        assert got.generation.prompt_tokens == expected.generation.prompt_tokens
        torch.testing.assert_close(got.generation.first_logits, expected.generation.first_logits, atol=1e-5, rtol=1e-5)
