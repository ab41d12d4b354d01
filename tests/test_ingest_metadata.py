"""`prune_eval.ingest` with metadata (issue 19.3): validated against the real config choices, stored
in the cell's experiment, and used to match the answers with published numbers and our own cells."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import POPE, REFERENCE_ANSWERS, run_cli
from test_report import experiment_of, pope_questions, simulate, write_cell

from prune_eval.analysis import analyse, choices
from prune_eval.config import group_choices
from prune_eval.data.images import PREPROCESSORS
from prune_eval.methods import method_names
from prune_eval.methods.sparsevlm import VERSIONS

QUESTIONS = ["--questions", str(POPE / "llava-1.5" / "llava_pope_test.jsonl"), "--labels", str(POPE / "llava-1.5")]


def ingest_cli(tmp_path, *extra: str, name: str = "x", answers=REFERENCE_ANSWERS):
    return run_cli([*QUESTIONS, "--answers", str(answers), "--name", name, "--out", str(tmp_path / "out"), *extra], tmp_path,
                   module="prune_eval.ingest")


def test_choices_are_the_registries_and_conf() -> None:
    assert choices.group_choices("method") == sorted(method_names())
    assert choices.group_choices("preprocess") == sorted(PREPROCESSORS.names())
    for group in ("model", "quant", "method", "preprocess"):
        assert choices.group_choices(group) == group_choices(group)
    assert choices.METHOD_VERSIONS == {"sparsevlm": tuple(VERSIONS)}


def test_reading_choices_does_not_import_torch() -> None:
    code = ("import sys; from prune_eval.analysis import choices; choices.check_metadata(model='llava-1.5-7b', "
            "method='sparsevlm', version='1.5', budget=64, quant='fp16', preprocess='pad'); "
            "assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("extra, message", [
    (["--method", "visonzip", "--budget", "64"],
     "unknown method 'visonzip'; did you mean 'visionzip'? choices: downsample, fastv, random, sparsevlm, vanilla, visionzip"),
    (["--method", "sparsevlm", "--budget", "64"],
     "--method sparsevlm needs --version (v1, v1.5, v2): its versions are different algorithms with different published numbers"),
    (["--method", "sparsevlm", "--version", "v1.6", "--budget", "64"],
     "unknown version of sparsevlm 'v1.6'; did you mean 'v1.5'? choices: v1, v1.5, v2"),
    (["--method", "visionzip", "--version", "v1", "--budget", "64"],
     "--version v1: method 'visionzip' has no algorithm versions (only sparsevlm has); the POPE question-file version is --pope-version"),
    (["--method", "visionzip"], "--method visionzip needs --budget (the visual-token budget the answers were produced at)"),
    (["--method", "visionzip", "--budget", "0"], "--budget 0: must be a positive whole number of visual tokens"),
    (["--model", "llava-7b", "--method", "visionzip", "--budget", "64"], "unknown model 'llava-7b'"),
    (["--method", "visionzip", "--budget", "64", "--quant", "fp8"], "unknown quant 'fp8'"),
    (["--method", "visionzip", "--budget", "64", "--preprocess", "resize"], "unknown preprocess 'resize'"),
    (["--budget", "64"], "--budget describes a method; give --method too (choices: downsample, fastv, random, sparsevlm, vanilla, visionzip)"),
    (["--version", "llava-1.5"], "--version llava-1.5 is a POPE question-file version; that is --pope-version now"),
])
def test_bad_metadata_is_one_line_with_the_choices(tmp_path, extra, message) -> None:
    done = ingest_cli(tmp_path, *extra)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("prune_eval.ingest: error: " + message), line
    assert not (tmp_path / "out").exists()  # nothing written


def test_metadata_goes_into_the_experiment_and_matches_published_numbers(tmp_path) -> None:
    done = ingest_cli(tmp_path, "--model", "llava-1.5-7b", "--method", "sparsevlm", "--version", "1.5", "--budget", "64",
                      "--quant", "fp16", "--preprocess", "pad", "--pope-version", "llava-1.5", name="svlm")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "svlm" / "summary.json").read_text())
    exp = summary["experiment"]
    assert exp["model"] == {"name": "llava-1.5-7b"} and exp["quant"] == {"name": "fp16"} and exp["preprocess"] == "pad"
    assert exp["method"] == {"name": "sparsevlm", "version": None, "params": {"version": "v1.5", "budget": 64}}
    assert summary["ingested"]["metadata"] == {"model": "llava-1.5-7b", "method": "sparsevlm", "version": "v1.5", "budget": 64,
                                               "quant": "fp16", "preprocess": "pad"}
    a = analyse.analyse(tmp_path / "out", n_resamples=100)
    (config,) = a.configs
    assert config.label == "svlm (SparseVLM v1.5 @64)"
    assert a.config_stats[config.id].paper.value == 77.5


def test_an_answer_file_is_paired_with_our_own_cell_of_the_same_configuration(tmp_path) -> None:
    """Ingested official answers vs prune_eval's cell of the same model, method, version and budget:
    an 'implementation' comparison (their code vs ours), over the same questions."""
    sweep = tmp_path / "out"
    q = pope_questions("llava-1.5")
    write_cell(sweep, "ours", q, simulate(q, accuracy=0.8, seed=1), experiment=experiment_of("sparsevlm", 64, version="v1.5"), budget=64)
    write_cell(sweep, "other", q, simulate(q, accuracy=0.8, seed=2), experiment=experiment_of("visionzip", 64), budget=64)
    done = ingest_cli(tmp_path, "--model", "llava-1.5-7b", "--method", "sparsevlm", "--version", "v1.5", "--budget", "64",
                      name="official")
    assert done.returncode == 0, done.stderr
    a = analyse.analyse(sweep, n_resamples=100)
    (c,) = [c for c in a.comparisons if c.pair.factor == "implementation"]
    assert {c.pair.a.label, c.pair.b.label} == {"official (SparseVLM v1.5 @64)", "SparseVLM v1.5 @64"}
    assert c.pair.a.info["ingested"] and c.problem is None and c.n_questions == 8910
    assert not any({x.pair.a.label, x.pair.b.label} == {"official (SparseVLM v1.5 @64)", "VisionZip @64"} for x in a.comparisons)
