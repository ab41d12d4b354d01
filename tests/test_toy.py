"""The shipped toy LLaVA (prune_eval/assets/toy) shows real effects through the real CLI and report.

One demo sweep on the synthetic test split (generator seed 0; the toy was trained on seed 1000, so
no test image was seen in training): vanilla, `random` at 16 tokens, and `random` at 64 tokens with
two seeds (one configuration, two draws: an A/A comparison). The report's paired image-cluster
permutation test must find random@16 worse than vanilla (p < 0.01) and must not find the two draws
of random@64 different.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from prune_eval.analysis import report
from prune_eval.models import loading
from prune_eval.execution.records import sha256_file

pytestmark = pytest.mark.slow

TOY = Path(loading.TOY_DIR)
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HYDRA_FULL_ERROR": "0"}


def test_shipped_weights_match_their_model_card() -> None:
    """The card names the weights it describes (sha256) and their architecture: the real LLaVA
    layout with CLIP-style 336/14 patches (576 visual tokens)."""
    card = json.loads((TOY / "training.json").read_text())
    assert sha256_file(TOY / "model.safetensors") == card["model_sha256"]
    config = json.loads((TOY / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"]) == (336, 14)
    assert config["text_config"]["num_hidden_layers"] == card["dims"]["text_layers"]
    assert card["train_data"]["seed"] != 0, "training images must not be the test split's (seed 0)"
    with safe_open(str(TOY / "model.safetensors"), "pt") as f:
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == card["parameters"]


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    sweep = [sys.executable, "-m", "prune_eval", "-m", "experiment=demo", "name=toy"]
    for args in ([*sweep, "method=random", "budget=16,64", "seed=0,1"], [*sweep, "method=vanilla"]):
        done = subprocess.run(args, cwd=root, env=ENV, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return root / "outputs" / "toy"


def cell_named(sweep: Path, prefix: str) -> str:
    (name,) = [p.name for p in sweep.iterdir() if p.name.startswith(prefix) and (p / "summary.json").exists()]
    return name


def test_vanilla_answers_the_test_split(toy_sweep) -> None:
    summary = json.loads((toy_sweep / cell_named(toy_sweep, "vanilla") / "summary.json").read_text())
    assert summary["experiment"]["model"]["weights_sha256"] == json.loads((TOY / "training.json").read_text())["model_sha256"]
    accuracy = summary["metrics"]["llava"]["pooled_accuracy"]
    print(f"\ntoy vanilla on the synthetic test split: accuracy {accuracy:.4f} over {summary['n_questions']} questions")
    assert accuracy >= 0.90


def test_random_16_is_worse_and_two_draws_of_one_configuration_are_not_different(toy_sweep) -> None:
    a, b = cell_named(toy_sweep, "random-64_seed0"), cell_named(toy_sweep, "random-64_seed1")
    analysis = report.analyse(toy_sweep, n_resamples=2000, pairs=[(a, b)])
    by_cells = {frozenset((c.pair.cell_a.data.name, c.pair.cell_b.data.name)): c for c in analysis.comparisons}
    worse = by_cells[frozenset((cell_named(toy_sweep, "random-16_seed0"), cell_named(toy_sweep, "vanilla")))]
    a_a = by_cells[frozenset((a, b))]
    print(f"\nrandom@16 vs vanilla: gap {worse.bootstrap.estimate:+.4f} mean F1, perm p {worse.permutation.p_value:.4g}; "
          f"random@64 seed 0 vs seed 1: gap {a_a.bootstrap.estimate:+.4f}, perm p {a_a.permutation.p_value:.4g}")
    assert worse.bootstrap.estimate < 0 and worse.permutation.p_value < 0.01 and worse.reject
    assert not a_a.identical and a_a.permutation.p_value > 0.05 and not a_a.reject
    assert "a real difference" in worse.verdict
    assert "not distinguishable from noise" in a_a.verdict or "not established" in a_a.verdict
