"""The reconciliation: from the published gap to the measured one, axis by axis (issue 19.1).

Every number of a reconciliation row is checked against a direct computation from the records:
- simulated cells in the record format (quick): version, measured version effect, budget meaning at
  equal compute (interpolated), conventions, a setup axis with its interaction, the numerical floor,
  sampling noise;
- the issue's end-to-end case (slow): two answer files built from the real LLaVA-1.5-13B answers
  with seeded, image-correlated flips (pooled accuracy 0.803 vs 0.806), ingested as VisionZip@64
  and SparseVLM v1.5@64: the conclusion names the version axis;
- a toy sweep through the real CLI (slow): method x SparseVLM version x seed x a numerics setting x
  a dtype; every reconciliation row of VisionZip@64 vs SparseVLM v1.5@64 carries measured numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import POPE, REFERENCE_ANSWERS, run_cli
from test_report import counts_of, experiment_of, pope_questions, simulate, write_cell

from prune_eval.execution import records
from prune_eval.analysis import analyse, metrics, stats
from prune_eval.analysis.wording import pts_exact

RESAMPLES = 500


def f1(counts: np.ndarray) -> float:
    return 100 * float(metrics.mean_f1(counts.sum(0)))


def sgn(points: float) -> str:
    return pts_exact(points / 100, True)


def step(r, axis: str):
    return next(s for s in r.steps if s.axis == axis)


def bootstrap_replicates(a: np.ndarray, statistic, *, n: int, seed: int) -> np.ndarray:
    """An independent image bootstrap: draw C images with replacement n times (as scipy draws its
    indices), recompute `statistic(weights (C,))` on each replicate."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, a.shape[0], (n, a.shape[0]))
    return np.array([statistic(np.bincount(row, minlength=a.shape[0]).astype(float)) for row in draws])


# ----------------------------------------------------------------------------------------------
# Simulated cells
QUESTIONS = pope_questions("llava-1.5")
IMAGES = sorted({q["image"] for q in QUESTIONS})[:80]
SUBSET = [q for q in QUESTIONS if q["image"] in set(IMAGES)]
OTHER_NUMERICS = {"fast": True, "compile": False, "batch_images": 1, "batch_tokens": 32768}


def cell(sweep, name, method, *, version=None, budget=64, preprocess="pad", numerics=None, accuracy=0.8, sim=0,
         answers=None, compute=None):
    exp = experiment_of(method, budget, version=version, preprocess=preprocess)
    exp["numerics"] = numerics or {"fast": False, "compile": False, "batch_size": 8}
    out = answers if answers is not None else simulate(SUBSET, accuracy=accuracy, seed=sim)
    write_cell(sweep, name, SUBSET, out, experiment=exp, budget=budget, compute=compute)
    return out


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("reconcile")
    vz = cell(sweep, "vz64", "visionzip", accuracy=0.80, sim=1, compute={"entering": 64, "input_seen": 64.0})
    cell(sweep, "vz128", "visionzip", budget=128, accuracy=0.84, sim=2, compute={"entering": 128, "input_seen": 128.0})
    sv = cell(sweep, "sv15-64", "sparsevlm", version="v1.5", accuracy=0.81, sim=3,
              compute={"entering": 576, "input_seen": 82.25, "official_equal_tokens": 64.0})
    cell(sweep, "sv1-64", "sparsevlm", version="v1", accuracy=0.78, sim=4, compute={"entering": 576, "input_seen": 70.0})
    cell(sweep, "vz64-crop", "visionzip", preprocess="crop", accuracy=0.78, sim=5)
    cell(sweep, "sv15-64-crop", "sparsevlm", version="v1.5", preprocess="crop", accuracy=0.80, sim=6)
    flipped = list(vz)
    for k in (0, 7, 40):  # the other numerics change three answers of VisionZip and none of SparseVLM
        flipped[k] = "No" if flipped[k] == "Yes" else "Yes"
    cell(sweep, "vz64-n1", "visionzip", numerics=OTHER_NUMERICS, answers=flipped)
    cell(sweep, "sv15-64-n1", "sparsevlm", version="v1.5", numerics=OTHER_NUMERICS, answers=list(sv))
    return sweep, analyse.analyse(sweep, n_resamples=RESAMPLES, seed=0)


def test_simulated_reconciliation_numbers_are_the_records(simulated) -> None:
    sweep, a = simulated
    (r,) = [r for r in a.reconciliations if (r.a, r.b) == ("VisionZip @64", "SparseVLM v1.5 @64")]
    vz, sv = counts_of(sweep / "vz64")[0], counts_of(sweep / "sv15-64")[0]
    measured = f1(vz) - f1(sv)
    assert r.measured == pytest.approx(measured)
    # version: the table's 75.1 is v1's; v1.5 publishes 77.5
    assert (r.published_gap, r.versions_gap, r.version_effect) == (1.9, -0.5, -2.4)
    version = step(r, "version")
    assert version.effect == -2.4 and "the published 75.1 is SparseVLM v1's; v1.5, which was run, publishes 77.5" in version.evidence
    v1 = counts_of(sweep / "sv1-64")[0]
    assert f"SparseVLM v1.5 @64 minus SparseVLM v1 @64 = {sgn(f1(sv) - f1(v1))}" in version.evidence
    assert f"would move the gap by {sgn(f1(sv) - f1(v1))}" in version.evidence
    # budget meaning: VisionZip interpolated between 64 and 128 tokens to SparseVLM's 82.25 per layer
    vz128 = counts_of(sweep / "vz128")[0]
    at_equal = f1(vz) + (f1(vz128) - f1(vz)) * (82.25 - 64) / (128 - 64) - f1(sv)
    budget = step(r, "budget meaning")
    assert f"the gap is {sgn(at_equal)}" in budget.evidence and budget.effect == pytest.approx(at_equal - measured)
    assert "SparseVLM v1.5 @64: nominal 64, 576 entering the LLM, 82.2 per layer on average" in budget.evidence
    # conventions: pooled accuracy under LLaVA's rule, both sides' values
    acc = {name: 100 * float(metrics.pooled_accuracy(counts_of(sweep / name)[0].sum(0))) for name in ("vz64", "sv15-64")}
    row = step(r, "metric convention: pooled accuracy, LLaVA rule (what re-implementations often print)")
    assert row.measured == f"VisionZip @64 {acc['vz64']:.2f} vs SparseVLM v1.5 @64 {acc['sv15-64']:.2f}"
    # setup: preprocessing as the paper (pad); crop measured: effects and the interaction with its interval
    vzc, svc = counts_of(sweep / "vz64-crop")[0], counts_of(sweep / "sv15-64-crop")[0]
    interaction = (f1(vz) - f1(sv)) - (f1(vzc) - f1(svc))

    def replicate(w):
        tot = lambda c: 100 * float(metrics.mean_f1((w[:, None, None] * c).sum(0)))  # noqa: E731
        return (tot(vz) - tot(sv)) - (tot(vzc) - tot(svc))

    reps = bootstrap_replicates(vz, replicate, n=min(RESAMPLES, 2000), seed=0)
    low, high = np.quantile(reps, [0.025, 0.975])
    pre = step(r, "setup: preprocessing")
    assert pre.effect is None and pre.evidence.startswith("same as the paper; measured against other settings: pad vs crop: ")
    assert (f"VisionZip @64 {sgn(f1(vz) - f1(vzc))}, SparseVLM v1.5 @64 {sgn(f1(sv) - f1(svc))}, gap {sgn(interaction)} "
            f"[95% CI {sgn(low)} to {sgn(high)}]") in pre.evidence
    # numerical floor: three answers of VisionZip changed, none of SparseVLM's
    vzn = counts_of(sweep / "vz64-n1")[0]
    floor = step(r, "numerical floor")
    assert r.floor.answers == 3 and r.floor.points == pytest.approx(abs(f1(vz) - f1(vzn)))
    assert "numerics: batch_images, batch_size, batch_tokens, fast (VisionZip @64 · fast path, batch_images=1" in floor.evidence
    assert f"3 answers, {sgn(f1(vz) - f1(vzn))}" in floor.evidence and "0 answers, +0.00" in floor.evidence
    assert f"gap changes by {sgn(f1(vzn) - f1(vz))}" in floor.evidence
    # sampling noise: the primary interval of the comparison
    boot = stats.paired_cluster_bootstrap(vz, sv, metric=metrics.mean_f1, n_resamples=RESAMPLES, rng=0)
    assert (r.low, r.high) == pytest.approx((100 * boot.confidence_interval.low, 100 * boot.confidence_interval.high))
    noise = step(r, "sampling noise")
    inside = 100 * boot.confidence_interval.low - 0.1 <= 1.9 <= 100 * boot.confidence_interval.high + 0.1
    assert f"the published gap +1.90 is {'inside' if inside else 'outside'} the 95% CI" in noise.evidence
    # the walk sums: published -> version -> remaining -> measured
    walk = r.walk()
    assert [w[0] for w in walk] == ["published", "version", "published, versions run", "remaining", "measured"]
    assert walk[0][2] + walk[1][2] + walk[3][2] == pytest.approx(walk[-1][2])
    assert "(1) SparseVLM version: -2.40 points" in r.conclusion


# ----------------------------------------------------------------------------------------------
# The issue's end-to-end case
def pope_llava_labels() -> dict[int, tuple[str, str]]:
    offsets = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}  # llava_pope_test.jsonl ids
    out = {}
    for split, offset in offsets.items():
        for line in (POPE / "llava-1.5" / f"coco_pope_{split}.json").read_text().splitlines():
            row = json.loads(line)
            out[row["question_id"] + offset] = (row["label"], row["image"])
    return out


def eval_pope_rule(text: str) -> str:
    """LLaVA's eval_pope.py, written out again."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def flipped_answers(target: float, rng: np.random.Generator, shared: dict, rows: list[dict], labels: dict) -> list[dict]:
    """The 13B answers with correct 'Yes' answers turned into 'No' (the errors of an over-pruned model:
    recall falls, precision stays), chosen by weighted sampling without replacement where an image's
    weight is a shared difficulty times a method-specific one (image-correlated), until the pooled
    accuracy is `target`."""
    images = sorted(shared)
    own = dict(zip(images, rng.lognormal(0, 0.5, len(images))))
    correct = np.array([eval_pope_rule(r["text"]) == labels[r["question_id"]][0] for r in rows])
    flippable = np.array([labels[r["question_id"]][0] == "yes" and eval_pope_rule(r["text"]) == "yes" for r in rows])
    weight = np.array([shared[labels[r["question_id"]][1]] * own[labels[r["question_id"]][1]] for r in rows])
    key = np.where(flippable, -np.log(rng.random(len(rows))) / weight, np.inf)
    out = [dict(r) for r in rows]
    for i in np.argsort(key)[: int(correct.sum() - round(target * len(rows)))]:
        out[i]["text"] = "No"
    return out


@pytest.mark.slow
def test_issue_19_two_answer_files_name_the_version_axis(tmp_path) -> None:
    labels = pope_llava_labels()
    rows = [json.loads(line) for line in REFERENCE_ANSWERS.read_text().splitlines()]
    rng = np.random.default_rng(19)
    images = sorted({image for _, image in labels.values()})
    shared = dict(zip(images, rng.lognormal(0, 1.0, len(images))))
    out = tmp_path / "compare"
    for name, target, extra in (("vz", 0.803, ["--method", "visionzip"]), ("svlm", 0.806, ["--method", "sparsevlm", "--version", "v1.5"])):
        answers = flipped_answers(target, rng, shared, rows, labels)
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in answers))
        done = run_cli(["--questions", str(POPE / "llava-1.5" / "llava_pope_test.jsonl"), "--labels", str(POPE / "llava-1.5"),
                        "--answers", str(path), "--name", name, "--out", str(out), "--model", "llava-1.5-7b", "--budget", "64",
                        *extra], tmp_path, module="prune_eval.ingest")
        assert done.returncode == 0, done.stderr
    done = run_cli([str(out), "--resamples", "2000"], tmp_path, module="prune_eval.report")
    assert done.returncode == 0, done.stderr
    md = (out / "report" / "report.md").read_text()
    assert md.index("## Reconciliation with the published numbers") < md.index("## How to read this report") < md.index("## Verdicts")

    vz, _, vz_rows = counts_of(out / "vz")
    sv, _, _ = counts_of(out / "svlm")
    acc_vz, acc_sv = (100 * float(metrics.pooled_accuracy(c.sum(0))) for c in (vz, sv))
    assert (round(acc_vz, 1), round(acc_sv, 1)) == (80.3, 80.6)
    boot = stats.paired_cluster_bootstrap(vz, sv, metric=metrics.mean_f1, n_resamples=2000, rng=0)
    gap, low, high = (100 * x for x in (boot.estimate, boot.confidence_interval.low, boot.confidence_interval.high))
    conclusion = re.search(r"### #1 vz \(VisionZip @64\) vs svlm \(SparseVLM v1\.5 @64\): published \+1\.90 → measured (\S+) points\n\n"
                           r"(.*?)\n\n!\[", md, flags=re.S)
    assert conclusion[1] == sgn(gap)
    text = conclusion[2]  # the headline, the ranked explanations, the remarks: what a reader sees first
    assert "the published 75.1 is SparseVLM v1's; v1.5, which was run, publishes 77.5" in text
    assert "Explanations ranked by measured size:\n\n1. SparseVLM version: -2.40 points" in text
    outside = not (low - 0.1 <= 1.9 <= high + 0.1)
    assert f"The published +1.90 lies {'outside' if outside else 'inside'} the measured 95% CI" in text
    assert f"measured here: {sgn(gap)} points [95% CI {sgn(low)} to {sgn(high)}]" in text
    assert f"pooled accuracy, LLaVA rule {acc_vz:.2f} vs {acc_sv:.2f}, gap {sgn(acc_vz - acc_sv)}" in text
    row = next(line for line in md.splitlines() if line.startswith("| metric convention: pooled accuracy, LLaVA rule"))
    assert f"vz (VisionZip @64) {acc_vz:.2f} vs svlm (SparseVLM v1.5 @64) {acc_sv:.2f}" in row
    # the gap of a reversal with the published direction, explained by the version if the signs agree
    if gap < 0:
        assert "The sign is reversed relative to the published gap." in text
    print(f"\nissue 19 case: pooled accuracy {acc_vz:.2f} vs {acc_sv:.2f}; mean F1 gap {gap:+.2f} [{low:+.2f}, {high:+.2f}]\n{text}")


# ----------------------------------------------------------------------------------------------
# A toy sweep through the real CLI
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HYDRA_FULL_ERROR": "0"}
TOY = ["experiment=demo", "name=toy", "data.n_images=2", "eval.max_new_tokens=2", "eval.part_size=12", "eval.fast=true",
       "budget=64", "hydra.sweeper.report=false"]


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory) -> Path:
    """VisionZip and vanilla over seed x batch composition x dtype; SparseVLM v1 and v1.5 over seeds,
    v1.5 also over batch composition and dtype (the partners the reconciliation needs)."""
    root = tmp_path_factory.mktemp("toy-reconcile")
    sweeps = (["method=vanilla,visionzip", "seed=0,1", "eval.batch_images=1,2", "quant=fp32,bf16"],
              ["method=sparsevlm", "method.version=v1,v1.5", "seed=0,1", "eval.batch_images=2", "quant=fp32"],
              ["method=sparsevlm", "method.version=v1.5", "seed=0", "eval.batch_images=1,2", "quant=fp32,bf16"])
    for overrides in sweeps:
        done = subprocess.run([sys.executable, "-m", "prune_eval", "-m", *TOY, *overrides], cwd=root, env=ENV,
                              capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return root / "outputs" / "toy"


def cell_named(sweep: Path, method: str, seed: int, quant: str, batch_images: int) -> Path:
    """The cell of this configuration that serves `seed` (a method that draws no random numbers has
    one `anyseed` cell for every seed)."""
    (found,) = [p for p in sweep.iterdir() if (p / "summary.json").exists()
                and p.name.startswith((f"{method}_seed{seed}_toy-{quant}", f"{method}_anyseed_toy-{quant}"))
                and json.loads((p / "cell.json").read_text())["experiment"]["numerics"]["batch_images"] == batch_images]
    return found


@pytest.mark.slow
def test_toy_sweep_renders_every_reconciliation_row_with_measured_numbers(toy_sweep) -> None:
    done = run_cli([str(toy_sweep), "--resamples", "300"], toy_sweep, module="prune_eval.report")
    assert done.returncode == 0, done.stderr
    a = analyse.analyse(toy_sweep, n_resamples=300)
    assert a.family.source == "plan.json" and a.family.factors == {"method", "numerics", "quant"}
    (r,) = [r for r in a.reconciliations if (r.a, r.b) == ("VisionZip @64", "SparseVLM v1.5 @64")]
    vz, sv = cell_named(toy_sweep, "visionzip-64", 0, "fp32", 2), cell_named(toy_sweep, "sparsevlm-v1.5-64", 0, "fp32", 2)
    cvz, csv_ = counts_of(vz)[0], counts_of(sv)[0]
    assert r.measured == pytest.approx(f1(cvz) - f1(csv_))
    # version: published v1 vs run v1.5, and the measured effect of v1 in the same setup
    v1 = counts_of(cell_named(toy_sweep, "sparsevlm-v1-64", 0, "fp32", 2))[0]
    version = step(r, "version")
    assert version.effect == -2.4 and f"SparseVLM v1.5 @64 minus SparseVLM v1 @64 = {sgn(f1(csv_) - f1(v1))}" in version.evidence
    # budget meaning: SparseVLM's per-layer visual tokens from its records
    rows = records.read_records(sv).records
    seen = float(np.mean([np.mean(x["visual_tokens_per_layer"]) for x in rows]))
    assert f"SparseVLM v1.5 @64: nominal 64, 576 entering the LLM, {seen:.1f} per layer on average" in step(r, "budget meaning").evidence
    # dtype: the paper's fp16 not run on the CPU; bf16 vs fp32 measured for both methods
    dtype = step(r, "setup: dtype / quantization")
    vzb, svb = (counts_of(cell_named(toy_sweep, m, 0, "bf16", 2))[0] for m in ("visionzip-64", "sparsevlm-v1.5-64"))
    assert dtype.evidence.startswith("differs from the paper, not measured: rerun with quant=fp16 to measure it; "
                                     "measured against other settings: fp32 vs bf16: ")
    assert (f"VisionZip @64 {sgn(f1(cvz) - f1(vzb))}, SparseVLM v1.5 @64 {sgn(f1(csv_) - f1(svb))}, "
            f"gap {sgn((f1(cvz) - f1(csv_)) - (f1(vzb) - f1(svb)))}") in dtype.evidence
    # numerical floor: batch composition 1 vs 2 images, from the records
    vz1, sv1 = (cell_named(toy_sweep, m, 0, "fp32", 1) for m in ("visionzip-64", "sparsevlm-v1.5-64"))
    changed = [int(np.sum(np.array([x["pred_llava"] for x in sorted(records.read_records(c).records, key=lambda x: x["key"])])
                          != np.array([x["pred_llava"] for x in sorted(records.read_records(o).records, key=lambda x: x["key"])])))
               for c, o in ((vz, vz1), (sv, sv1))]
    floor = step(r, "numerical floor")
    assert floor.effect is not None and r.floor.answers == max(changed)
    assert f"{changed[0]} answers, {sgn(f1(cvz) - f1(counts_of(vz1)[0]))}" in floor.evidence
    assert f"{changed[1]} answers, {sgn(f1(csv_) - f1(counts_of(sv1)[0]))}" in floor.evidence
    # every row has numbers measured here, except axes set as in the paper and the model (toy vs 7B: not sweepable)
    for s in r.steps:
        if s.evidence.startswith("same as the paper") or s.axis == "setup: model":
            continue
        assert s.effect is not None or re.search(r"\d\.\d", s.measured + " " + s.evidence), s
    assert step(r, "setup: model").evidence.startswith("differs from the paper: the published numbers are llava-1.5-7b's")
    # seeds: the gap on each common seed, and whether any seed changed a prediction, from the records
    (c,) = [c for c in a.comparisons if c.pair.a.label == "VisionZip @64" and c.pair.b.label == "SparseVLM v1.5 @64"]
    assert c.seeds.seeds == (0, 1)
    for k, s in enumerate((0, 1)):
        pair = [counts_of(cell_named(toy_sweep, m, s, "fp32", 2))[0] for m in ("visionzip-64", "sparsevlm-v1.5-64")]
        assert 100 * c.seeds.gaps[k] == pytest.approx(f1(pair[0]) - f1(pair[1]))
    preds = {m: [[x["pred_llava"] for x in sorted(records.read_records(cell_named(toy_sweep, m, s, "fp32", 2)).records,
                                                   key=lambda x: x["key"])] for s in (0, 1)] for m in ("visionzip-64", "sparsevlm-v1.5-64")}
    assert c.seeds.changed_predictions == any(p[0] != p[1] for p in preds.values())
    # agreement with vanilla for VisionZip's cells
    g = a.agreements[vz.name]
    van = cell_named(toy_sweep, "vanilla-576", 0, "fp32", 2)
    mine = {x["key"]: x for x in records.read_records(vz).records}
    theirs = {x["key"]: x for x in records.read_records(van).records}
    assert g.vanilla_cell == van.name
    assert g.equal.estimate == pytest.approx(np.mean([mine[k]["pred_llava"] == theirs[k]["pred_llava"] for k in mine]))


# ----------------------------------------------------------------------------------------------
# The documented example runs, and what the README and docs quote is what it prints
REPO = Path(__file__).resolve().parents[1]


def bash_block(text: str) -> str:
    start = text.index("```bash\n") + len("```bash\n")
    return text[start:text.index("```\n", start)]


def quoted(text: str) -> list[str]:
    return [line[2:] for line in text.splitlines() if line.startswith("> ") and len(line) > 2]


@pytest.mark.slow
def test_documented_report_example_runs_and_its_quotes_are_real(tmp_path) -> None:
    docs = (REPO / "docs" / "report-example.md").read_text()
    readme = (REPO / "README.md").read_text()
    commands = bash_block(docs)
    assert commands in readme  # the README shows the same commands
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").symlink_to(POPE.parents[1])  # ../shared from the working directory, as from the repository
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    md = (work / "outputs" / "compare" / "report" / "report.md").read_text().replace("**", "")
    lines = quoted(docs)
    assert len(lines) == 6 and quoted(readme)[: len(lines)] == lines
    for line in lines:
        assert line in md, line
    screenshot = REPO / "docs" / "report-screenshot.png"
    assert screenshot.read_bytes().startswith(b"\x89PNG")
