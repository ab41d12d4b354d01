"""Tests for prune_eval.analysis.report (and cellfiles, published, plots, render, which it is built from).

The report is checked end to end: from a real sweep of the tiny model through the CLI, from real
answer files through prune_eval.analysis.ingest, and from cells written here in the exact record format with
simulated answers to the real POPE questions (so that a 20-cell, 8910-question sweep with seeds,
quantization, preprocessing and both question-file versions exists without a GPU). Its numbers are
checked against direct calls to prune_eval.analysis.stats on the same records.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_DEMO, FASTPATH_DEMO, POPE, REFERENCE_ANSWERS, run_cli

from prune_eval.execution import records
from prune_eval.analysis import cellfiles, metrics, published, report, stats
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUTPUTS = ("report.md", "report.html", "cells.csv", "gaps.csv", "table.tex")


# ----------------------------------------------------------------------------------------------
# Writing cells in the record format, with simulated answers
def pope_questions(version: str) -> list[dict]:
    """The real POPE questions of a version ('llava-1.5': 8910, 'latest': 9000) as record stubs."""
    out = []
    for split in ("adversarial", "popular", "random"):
        for line in (POPE / version / f"coco_pope_{split}.json").read_text().splitlines():
            row = json.loads(line)
            out.append({"key": f"{split}/{row['question_id']}", "split": split, "question_id": row["question_id"],
                        "image": row["image"], "label": row["label"], "question": row["text"]})
    return out


def simulate(questions: list[dict], *, accuracy: float, seed: int, dotted: float = 0.0,
             image_sd: float = 1.0) -> list[str]:
    """Raw answers with correlated errors within an image (a random effect per image on the logit
    scale); `dotted` = share of answers written 'Yes.' / 'No.' (wrong under exact match only)."""
    rng = np.random.default_rng(seed)
    images = sorted({q["image"] for q in questions})
    effect = dict(zip(images, rng.normal(0, image_sd, len(images))))
    logit = np.log(accuracy / (1 - accuracy))
    answers = []
    for q in questions:
        right = rng.random() < 1 / (1 + np.exp(-(logit + effect[q["image"]])))
        word = q["label"] if right else ("no" if q["label"] == "yes" else "yes")
        answers.append(word.capitalize() + ("." if rng.random() < dotted else ""))
    return answers


def write_cell(sweep: Path, name: str, questions: list[dict], answers: list[str], *, experiment: dict,
               budget: int | None = None, visual_tokens: int | None = None, compute: dict | None = None) -> Path:
    """A complete cell as prune_eval.execution.cell writes it: parts with footers, cell.json, summary.json."""
    cell = sweep / name
    rows = [{**q, "schema_version": records.SCHEMA_VERSION, "raw_answer": a, "pred_llava": metrics.parse_llava(a),
             "pred_exact": metrics.parse_exact(a), "visual_tokens": visual_tokens, "new_tokens": 1,
             "stop_reason": "eos"} for q, a in zip(questions, answers)]
    for start in range(0, len(rows), 4000):
        records.write_part(cell, rows[start:start + 4000])
    records.atomic_write_json(cell / "cell.json", {"name": name, "experiment": experiment})
    records.atomic_write_json(cell / "summary.json", {
        "status": "complete", "schema_version": 1, "cell": name, "experiment": experiment,
        "config": {"budget": budget}, "method": experiment["method"], "n_questions": len(rows), "compute": compute,
        "records": [{"file": p.name, "sha256": records.sha256_file(p)} for p in records.part_paths(cell)],
    })
    return cell


def experiment_of(method: str, budget: int, *, seed: int = 0, version: str | None = None, quant: str = "fp16",
                  preprocess: str = "pad", model: str = "llava-1.5-7b", data: str = "llava-1.5",
                  tokenization: str = "hf") -> dict:
    params = {"visual_tokens": 576 if method == "vanilla" else budget}
    if version:
        params = {"version": version, "budget": budget, "recycling": True}
    return {"model": {"name": model, "source": "hub", "checkpoint": f"llava-hf/{model}-hf", "revision": None,
                      "tokenization": tokenization},
            "quant": {"name": quant}, "preprocess": preprocess,
            "data": {"name": "pope", "version": data, "splits": ["adversarial", "popular", "random"], "format": "pope"},
            "method": {"name": method, "version": "1", "params": params}, "seed": seed, "max_new_tokens": 128}


# accuracy of each simulated method: (method, version) -> {budget: accuracy}
SIMULATED = {("visionzip", None): {64: 0.80, 128: 0.84, 192: 0.855},
             ("sparsevlm", "v1"): {64: 0.79, 128: 0.82, 192: 0.845},
             ("random", None): {64: 0.72, 128: 0.78, 192: 0.81}}


def campaign(sweep: Path) -> list[str]:
    """20 cells over 8910 real questions (9000 for two): methods x budgets, seeds, quant, preprocess."""
    q8910, q9000 = pope_questions("llava-1.5"), pope_questions("latest")
    names = []

    def add(name, questions, answers, **kw):
        exp = experiment_of(**kw)
        write_cell(sweep, name, questions, answers, experiment=exp, budget=kw.get("budget"),
                   visual_tokens=None if kw["method"] == "sparsevlm" else exp["method"]["params"].get("visual_tokens"),
                   compute={"entering": 576, "input_seen": 64.8, "official_equal_tokens": 64.0} if kw["method"] == "sparsevlm" else None)
        names.append(name)

    add("vanilla", q8910, simulate(q8910, accuracy=0.87, seed=1), method="vanilla", budget=576)
    for k, ((method, version), by_budget) in enumerate(SIMULATED.items()):
        for budget, acc in by_budget.items():
            # VisionZip writes 'Yes.' 15% of the time: the exact-match convention punishes only it
            dotted = 0.15 if method == "visionzip" else 0.0
            add(f"{method}-{budget}", q8910, simulate(q8910, accuracy=acc, seed=10 * k + budget, dotted=dotted),
                method=method, version=version, budget=budget)
    for seed in (1, 2):  # random baseline: seeds change predictions
        add(f"random-64-s{seed}", q8910, simulate(q8910, accuracy=0.72, seed=1000 + seed), method="random", budget=64, seed=seed)
    add("visionzip-64-s1", q8910, simulate(q8910, accuracy=0.80, seed=10 * 0 + 64, dotted=0.15), method="visionzip", budget=64, seed=1)
    add("visionzip-64-int8", q8910, simulate(q8910, accuracy=0.798, seed=7), method="visionzip", budget=64, quant="int8")
    add("visionzip-64-crop", q8910, simulate(q8910, accuracy=0.79, seed=8), method="visionzip", budget=64, preprocess="crop")
    add("sparsevlm-64-int8", q8910, simulate(q8910, accuracy=0.79, seed=9), method="sparsevlm", version="v1", budget=64, quant="int8")
    add("visionzip-64-latest", q9000, simulate(q9000, accuracy=0.78, seed=11), method="visionzip", budget=64, data="latest")
    add("sparsevlm-64-latest", q9000, simulate(q9000, accuracy=0.80, seed=12), method="sparsevlm", version="v1", budget=64, data="latest")
    add("vanilla-13b", q8910, simulate(q8910, accuracy=0.875, seed=13), method="vanilla", budget=576, model="llava-1.5-13b")
    add("vanilla-int8", q8910, simulate(q8910, accuracy=0.869, seed=14), method="vanilla", budget=576, quant="int8")
    assert len(names) == 20
    return names


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("campaign")
    campaign(sweep)
    return sweep


def ingest(out: Path, name: str, answers: Path) -> None:
    result = run_cli(["--questions", str(POPE / "llava-1.5" / "llava_pope_test.jsonl"), "--labels", str(POPE / "llava-1.5"),
                      "--answers", str(answers), "--name", name, "--out", str(out)], out, module="prune_eval.ingest")
    assert result.returncode == 0, result.stderr


def flipped_copy(source: Path, target: Path, *, share: float, seed: int) -> None:
    """A constructed second answer file: a seeded `share` of the answers turned from yes to no or back."""
    rng = np.random.default_rng(seed)
    lines = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        if rng.random() < share:
            row["text"] = "No" if row["text"].strip().lower().startswith("yes") else "Yes"
        lines.append(json.dumps(row))
    target.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def ingested_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingested")
    ingest(out, "llava13b", REFERENCE_ANSWERS)
    flipped_copy(REFERENCE_ANSWERS, out / "flip3.jsonl", share=0.03, seed=0)
    ingest(out, "llava13b-flip3", out / "flip3.jsonl")
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_outputs(report_dir: Path, figures: tuple[str, ...]) -> None:
    for name in OUTPUTS:
        assert (report_dir / name).stat().st_size > 0, name
    for name in figures:
        assert (report_dir / name).read_bytes().startswith(PNG_MAGIC), name
    page = (report_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", page), "report.html must not load anything"
    assert "<link" not in page and "<script" not in page
    walks = sorted(report_dir.glob("reconciliation-*.png"))  # one per reconciliation with the published numbers
    assert all(w.read_bytes().startswith(PNG_MAGIC) for w in walks)
    assert page.count("data:image/png;base64,") == len(figures) + len(walks)
    tex = (report_dir / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") >= 1


# ----------------------------------------------------------------------------------------------
# Boundaries
def test_report_modules_do_not_import_torch(tmp_path) -> None:
    q = pope_questions("llava-1.5")[:120]
    for name, acc in (("vanilla", 0.9), ("visionzip-64", 0.7)):
        method = name.split("-")[0]
        write_cell(tmp_path, name, q, simulate(q, accuracy=acc, seed=len(name)), budget=64,
                   experiment=experiment_of(method, 64))
    code = ("import sys; from pathlib import Path; import prune_eval.analysis.report as r; "
            f"r.write_report(Path({str(tmp_path)!r}), n_resamples=200); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report" / "report.md").exists()


def test_analysis_modules_import_each_other_without_a_cycle() -> None:
    """report -> analyse/render -> ... -> metrics: a directed acyclic graph (issue 19.8)."""
    import ast

    folder = Path(report.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "prune_eval.analysis":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prune_eval.analysis."):
                found.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = found
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        assert state.get(module) != "open", " -> ".join(path + [module])
        if state.get(module) == "done":
            return
        state[module] = "open"
        for other in graph.get(module, ()):
            visit(other, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
    assert "render" not in graph["analyse"] and "report" not in graph["render"]


def test_missing_directory_is_one_line_and_exit_2(tmp_path) -> None:
    result = run_cli(["/nonexistent"], tmp_path, module="prune_eval.report")
    assert result.returncode == 2
    assert result.stderr.strip() == "prune_eval.report: error: sweep directory not found: /nonexistent"
    empty = run_cli([str(tmp_path)], tmp_path, module="prune_eval.report")
    assert empty.returncode == 2 and "holds no cells" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# A 20-cell campaign over the real questions: renders, is fast, and its numbers are stats.py's
@pytest.fixture(scope="module")
def campaign_report(campaign_dir) -> tuple[Path, float]:
    """The CLI with default resamples on 20 cells x 8910 questions, limited to 2 threads."""
    env = {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    start = time.perf_counter()
    result = run_cli([str(campaign_dir)], campaign_dir, module="prune_eval.report", env=env)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {campaign_dir / 'report' / 'report.md'}"
    return campaign_dir / "report", elapsed


@pytest.mark.slow
def test_campaign_report_renders_within_30_seconds(campaign_report) -> None:
    report_dir, elapsed = campaign_report
    print(f"report on 20 cells x 8910 questions: {elapsed:.1f} s")
    assert elapsed < 30, f"{elapsed:.1f} s"
    check_outputs(report_dir, ("forest.png", "budget.png", "splits.png"))
    cells = read_csv(report_dir / "cells.csv")
    assert len(cells) == 20 and {c["status"] for c in cells} == {"complete"}
    assert {c["n_questions"] for c in cells} == {"8910", "9000"}
    md = (report_dir / "report.md").read_text()
    assert md.index("VisionZip @64 vs SparseVLM v1 @64 (method") < md.index("VisionZip @64 vs vanilla (method"), \
        "VisionZip vs SparseVLM comes first, then comparisons against vanilla"
    assert ("Unless its label says otherwise, a configuration uses: model llava-1.5-7b, checkpoint "
            "llava-hf/llava-1.5-7b-hf, quant fp16, preprocess pad, data pope llava-1.5.") in md
    assert "vanilla · llava-1.5-13b vs vanilla (model/checkpoint: checkpoint, name; seed 0)" in md
    for factor in ("(quantization; seed 0)", "(preprocessing; seed 0)", "(model/checkpoint: checkpoint, name; seed 0)"):
        assert factor in md
    assert "entering 576, avg/layer 64.8, official 64" in md  # summary['compute'] shown when present


def primary_rows(report_dir: Path) -> list[dict]:
    return [r for r in read_csv(report_dir / "gaps.csv") if r["convention"] in ("mean_f1/llava", "")
            and (r["permutation_p"] or r["comparable"] == "False")]


def counts_of(cell_dir: Path, rule: str = "llava") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Counts (C, S, 6) computed here from the raw records, independently of the report."""
    rows = sorted(records.read_records(cell_dir).records, key=lambda r: r["key"])
    splits = sorted({r["split"] for r in rows})
    clusters = sorted({r["image"] for r in rows})
    counts = metrics.cluster_counts([r["label"] for r in rows], [r[f"pred_{rule}"] for r in rows],
                                    [r["split"] for r in rows], [r["image"] for r in rows], splits, clusters)
    correct = np.array([r["pred_llava"] == r["label"] for r in rows])
    return counts, correct, rows


@pytest.mark.slow
def test_report_numbers_equal_direct_stats_calls(campaign_report, campaign_dir) -> None:
    report_dir, _ = campaign_report
    rows = primary_rows(report_dir)
    assert len(rows) == 27 and all(r["comparable"] == "True" for r in rows)
    first = rows[0]
    assert (first["a"], first["b"]) == ("VisionZip @64", "SparseVLM v1 @64")
    ca, correct_a, recs = counts_of(campaign_dir / first["a_cell"])
    cb, correct_b, _ = counts_of(campaign_dir / first["b_cell"])
    boot = stats.paired_cluster_bootstrap(ca, cb, metric=metrics.mean_f1, n_resamples=10_000, rng=0)
    perm = stats.paired_cluster_permutation_test(ca, cb, metric=metrics.mean_f1, n_resamples=10_000, rng=0)
    mcnemar = stats.mcnemar_exact(correct_a, correct_b)
    acc = stats.paired_difference(correct_a.astype(float), correct_b.astype(float), [r["image"] for r in recs])
    family = [r for r in rows if r["family"] == "True"]
    assert first in family and len(family) == 5  # VisionZip vs SparseVLM: 3 budgets, int8, the 9000-question files
    assert all(r["factor"] == "method" and "vanilla" not in (r["a"] + r["b"]) and "random" not in (r["a"] + r["b"]) for r in family)
    expected = {"gap": boot.estimate, "ci_low": boot.confidence_interval.low, "ci_high": boot.confidence_interval.high,
                "bootstrap_se": boot.standard_error, "permutation_p": perm.p_value,
                "mde": stats.minimum_detectable_effect(boot.standard_error, alpha=0.05 / len(family)), "accuracy_gap": acc.estimate,
                "accuracy_se_clustered": acc.standard_error, "accuracy_se_unclustered": acc.standard_error_unclustered,
                "accuracy_mde": acc.minimum_detectable_effect, "mcnemar_p": mcnemar.p_value}
    for column, value in expected.items():
        assert float(first[column]) == pytest.approx(value, rel=1e-12, abs=1e-15), column
    assert (int(first["mcnemar_b"]), int(first["mcnemar_c"])) == (mcnemar.b, mcnemar.c)
    # Holm over the declared family: every primary p recomputed here from the records, then adjusted
    p_values = []
    for row in family:
        a, _, _ = counts_of(campaign_dir / row["a_cell"])
        b, _, _ = counts_of(campaign_dir / row["b_cell"])
        p_values.append(stats.paired_cluster_permutation_test(a, b, metric=metrics.mean_f1, n_resamples=10_000, rng=0).p_value)
    assert [float(r["permutation_p"]) for r in family] == pytest.approx(p_values, rel=1e-12)
    holm = stats.holm(p_values)
    assert [float(r["holm_p"]) for r in family] == pytest.approx(list(holm.p_values), rel=1e-12)
    assert [r["significant"] == "True" for r in family] == list(holm.reject)
    # diagnostic comparisons keep their unadjusted p, and 'significant' is at alpha unadjusted
    for row in rows:
        if row["family"] == "False":
            assert row["holm_p"] == "" and (row["significant"] == "True") == (float(row["permutation_p"]) <= 0.05)
    # the convention rows are the same predictions under other metrics
    exact_a, _, _ = counts_of(campaign_dir / first["a_cell"], "exact")
    exact_b, _, _ = counts_of(campaign_dir / first["b_cell"], "exact")
    pooled = next(r for r in read_csv(report_dir / "gaps.csv") if r["comparison"] == "1" and r["convention"] == "pooled_f1/exact")
    assert float(pooled["gap"]) == pytest.approx(float(metrics.pooled_f1(exact_a.sum(0)) - metrics.pooled_f1(exact_b.sum(0))))


@pytest.mark.slow
def test_campaign_report_sections(campaign_report) -> None:
    md = (campaign_report[0] / "report.md").read_text()
    # seeds: identical predictions said in words, never a reassuring +- 0
    assert "seeds 0, 1 gave identical predictions on all 8910 questions: the seed std (0) says nothing" in md
    assert "± 0.00 (seed std)" not in md
    assert re.search(r"predictions differ between seeds 0-2 on \d+ of 8910 questions", md)
    assert "seed + question 95% interval" in md
    assert "seed 0, the first of the common seeds 0, 1" in md
    # the 8910 vs 9000 question files: the simulated sign flip is found
    assert re.search(r"The sign flips under: .*mean F1 over splits, LLaVA rule \(the papers\) \(pope latest, 9000 q\)", md)
    # and VisionZip's 'Yes.' answers flip it under lmms-eval's exact-match accuracy
    assert re.search(r"The sign flips under: pooled accuracy, exact match \(lmms-eval's pope_accuracy\) "
                     r"\(pope llava-1.5, 8910 q\) — and its 95% CI excludes 0", md)
    # published values: matched by method, version, budget; setup differences named; the papers' gap
    assert "| SparseVLM v1 @64 | sparsevlm v1 (2024.10 release) | 75.1 | visionzip-t1, sparsevlm-v1-t1 |" in md
    assert "| VisionZip @64 · int8 | visionzip | 77.0 |" in md and "quant int8 |" in md
    assert re.search(r"VisionZip @64 vs SparseVLM v1 @64: ours [+-]\d+\.\d\d vs the papers' \+1\.9 \(ours - paper [+-]\d+\.\d\d\); "
                     r"the papers' gap is (inside|OUTSIDE) our 95% CI", md)
    # the reconciliation comes first
    assert md.index("## Reconciliation with the published numbers") < md.index("## Verdicts")
    assert "Yang et al., VisionZip (CVPR 2025), Table 1 (LLaVA-1.5-7B) (arXiv:2412.04467" in md


# ----------------------------------------------------------------------------------------------
# Real answer files through ingest: one command, one verdict
@pytest.mark.slow
def test_ingested_answer_files_give_a_verdict(ingested_dir) -> None:
    result = run_cli([str(ingested_dir), "--resamples", "2000"], ingested_dir, module="prune_eval.report")
    assert result.returncode == 0, result.stderr
    report_dir = ingested_dir / "report"
    check_outputs(report_dir, ("forest.png", "splits.png"))
    assert not (report_dir / "budget.png").exists()
    md = (report_dir / "report.md").read_text()
    assert "| C1 | llava13b | 85.95 [" in md  # the published check value of these answers
    (row,) = primary_rows(report_dir)
    assert (row["a"], row["b"]) == ("llava13b-flip3", "llava13b")
    ca, _, _ = counts_of(ingested_dir / "llava13b-flip3")
    cb, _, _ = counts_of(ingested_dir / "llava13b")
    boot = stats.paired_cluster_bootstrap(ca, cb, metric=metrics.mean_f1, n_resamples=2000, rng=0)
    assert float(row["gap"]) == pytest.approx(boot.estimate) and float(row["ci_high"]) == pytest.approx(boot.confidence_interval.high)
    assert boot.confidence_interval.high < 0
    assert f"llava13b-flip3's mean F1 is {abs(100 * boot.estimate):.2f} points lower than llava13b's" in md
    assert "a real difference at this sample size" in md and "one answer file each" in md


def small_cell(sweep: Path, name: str, method: str, *, accuracy: float, sim: int, n: int = 240, dotted: float = 0.0,
               **experiment) -> Path:
    """A cell on the first n real questions; `sim` seeds the simulated answers, `experiment` goes to experiment_of."""
    q = pope_questions("llava-1.5")[:n]
    return write_cell(sweep, name, q, simulate(q, accuracy=accuracy, seed=sim, dotted=dotted),
                      experiment=experiment_of(method, 64, **experiment), budget=64)


def analyse(sweep: Path, **kw) -> report.Analysis:
    return report.analyse(sweep, n_resamples=500, **kw)


def test_identical_predictions_and_noise_verdicts(tmp_path) -> None:
    small_cell(tmp_path, "visionzip", "visionzip", accuracy=0.8, sim=1)
    shutil.copytree(tmp_path / "visionzip", tmp_path / "random")  # same answers, other method
    exp = experiment_of("random", 64)
    summary = json.loads((tmp_path / "random" / "summary.json").read_text())
    records.atomic_write_json(tmp_path / "random" / "summary.json", {**summary, "cell": "random", "experiment": exp, "method": exp["method"]})
    small_cell(tmp_path, "sparsevlm", "sparsevlm", version="v1", accuracy=0.8, sim=2)
    verdicts = {(c.pair.a.label, c.pair.b.label): c.verdict for c in analyse(tmp_path).comparisons}
    assert verdicts[("VisionZip @64", "random @64")] == \
        ("VisionZip @64 and random @64 gave identical predictions on all 240 questions under both parsing rules: "
         "every gap is exactly 0; nothing to test.")
    assert "not distinguishable from noise" in verdicts[("VisionZip @64", "SparseVLM v1 @64")]


def test_cells_that_differ_only_in_tokenization_are_paired(tmp_path) -> None:
    small_cell(tmp_path, "hf", "vanilla", accuracy=0.8, sim=1)
    small_cell(tmp_path, "slow", "vanilla", accuracy=0.8, sim=2, tokenization="llava-slow")
    (c,) = analyse(tmp_path).comparisons
    assert (c.pair.a.label, c.pair.b.label) in {("vanilla · tokenization llava-slow", "vanilla"),
                                                ("vanilla", "vanilla · tokenization llava-slow")}
    assert c.pair.differs_in == "model/checkpoint: tokenization" and c.problem is None


def test_cells_that_differ_only_in_checkpoint_layout_are_paired(tmp_path) -> None:
    """llava-hf vs LLaVA's original checkpoint: the model identities plan_cell records for
    model=llava-1.5-7b and model=llava-1.5-7b-original, everything else equal -> one paired comparison."""
    from hydra import compose, initialize_config_dir

    from prune_eval.config import CONF_DIR, _model_identity

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        identities = {m: _model_identity(compose(config_name="config", overrides=[f"model={m}"]).model)
                      for m in ("llava-1.5-7b", "llava-1.5-7b-original")}
    q = pope_questions("llava-1.5")[:240]
    for sim, (name, identity) in enumerate(identities.items(), start=1):
        write_cell(tmp_path, name, q, simulate(q, accuracy=0.8, seed=sim), experiment={**experiment_of("vanilla", 64), "model": identity})
    (c,) = analyse(tmp_path).comparisons
    assert c.problem is None and c.pair.factor == "model"
    assert c.pair.differs_in == "model/checkpoint: checkpoint, name, source, tokenization, tokenizer, vision_tower"
    assert any("llava-1.5-7b-original" in label for label in (c.pair.a.label, c.pair.b.label))


def test_sign_flip_under_exact_match_is_named(tmp_path) -> None:
    # A is better under LLaVA's rule but writes 'Yes.' a third of the time: exact-match accuracy punishes it
    small_cell(tmp_path, "visionzip", "visionzip", accuracy=0.9, sim=1, dotted=0.35, n=1200)
    small_cell(tmp_path, "sparsevlm", "sparsevlm", version="v1", accuracy=0.85, sim=2, n=1200)
    (c,) = analyse(tmp_path).comparisons
    assert c.bootstrap.estimate > 0
    flipped = next(g for g in c.conventions if g.key == "pooled_accuracy/exact")
    assert flipped.high < 0
    assert report.sign_line(c) == ("The sign flips under: pooled accuracy, exact match (lmms-eval's pope_accuracy) "
                                   "(pope llava-1.5, 1200 q) — and its 95% CI excludes 0.")


# ----------------------------------------------------------------------------------------------
# Broken inputs: never a silent comparison
def test_different_question_sets_are_not_comparable(tmp_path) -> None:
    small_cell(tmp_path, "visionzip", "visionzip", accuracy=0.8, sim=1)
    small_cell(tmp_path, "sparsevlm", "sparsevlm", version="v1", accuracy=0.8, sim=2, n=230)
    small_cell(tmp_path, "random", "random", accuracy=0.7, sim=3)
    rows = [json.loads(line) for line in (tmp_path / "random" / "records" / "part-00000.jsonl").read_text().splitlines()[:-1]]
    rows[5]["label"] = "no" if rows[5]["label"] == "yes" else "yes"  # same ids, one label differs
    shutil.rmtree(tmp_path / "random" / "records")
    records.write_part(tmp_path / "random", rows)
    summary = json.loads((tmp_path / "random" / "summary.json").read_text())
    summary["records"] = [{"file": "part-00000.jsonl", "sha256": records.sha256_file(tmp_path / "random" / "records" / "part-00000.jsonl")}]
    records.atomic_write_json(tmp_path / "random" / "summary.json", summary)
    path = report.write_report(tmp_path, n_resamples=200)
    md = path.read_text()
    assert "VisionZip @64 vs SparseVLM v1 @64: not comparable: different question sets: visionzip has 240 questions, " \
           "sparsevlm has 230, 230 in common" in md
    assert "VisionZip @64 vs random @64: not comparable: the same 240 question ids, but 1 differ in label or image" in md
    gaps = read_csv(path.parent / "gaps.csv")
    untested = [r for r in gaps if r["comparable"] == "False"]
    assert len(untested) == 3 and all(r["gap"] == "" and r["holm_p"] == "" for r in untested)
    assert "0 tested" in md


def test_bad_cells_are_reported_and_excluded(tmp_path) -> None:
    def cell(name, method, sim, **kw):
        return small_cell(tmp_path, name, method, accuracy=0.8, sim=sim, n=120, **kw)

    cell("vanilla", "vanilla", 0)
    tampered = cell("visionzip", "visionzip", 1)
    part = tampered / "records" / "part-00000.jsonl"
    part.write_bytes(part.read_bytes().replace(b'"raw_answer": "Yes"', b'"raw_answer": "Yea"', 1))
    truncated = cell("random", "random", 2)
    part = truncated / "records" / "part-00000.jsonl"
    part.write_bytes(part.read_bytes()[:-40])
    rewritten = cell("sparsevlm", "sparsevlm", 3, version="v1")  # a valid part, but not the one summarized
    rows = records.read_records(rewritten).records
    shutil.rmtree(rewritten / "records")
    records.write_part(rewritten, [{**r, "raw_answer": "No", "pred_llava": "no", "pred_exact": "no"} for r in rows])
    malformed = cell("visionzip-128", "visionzip", 4, seed=1)
    rows = records.read_records(malformed).records
    shutil.rmtree(malformed / "records")
    records.write_part(malformed, [{**r, "label": "maybe"} if i == 3 else r for i, r in enumerate(rows)])
    summary = json.loads((malformed / "summary.json").read_text())
    summary["records"] = [{"file": "part-00000.jsonl", "sha256": records.sha256_file(malformed / "records" / "part-00000.jsonl")}]
    records.atomic_write_json(malformed / "summary.json", summary)

    entries = {e.name: e for e in report.analyse(tmp_path, n_resamples=200).entries}
    assert entries["vanilla"].status == "complete"
    assert entries["visionzip"].status == "excluded"
    assert entries["visionzip"].note.startswith("not used: part part-00000.jsonl failed verification: checksum mismatch")
    assert "truncated" in entries["random"].note
    assert entries["sparsevlm"].note == "not used: part-00000.jsonl changed after summary.json was written (sha256 differs)"
    assert entries["visionzip-128"].note.startswith("not used: malformed records: labels must be 'yes' or 'no'")
    md = report.write_report(tmp_path, n_resamples=200).read_text()
    assert "| visionzip | excluded | not used: part part-00000.jsonl failed verification: checksum mismatch" in md
    assert "No two configurations differ in exactly one factor" in md


def test_unknown_pair_cell_is_a_one_line_error(tmp_path) -> None:
    small_cell(tmp_path, "vanilla", "vanilla", accuracy=0.8, sim=0, n=60)
    result = run_cli([str(tmp_path), "--pair", "vanilla", "visonzip"], tmp_path, module="prune_eval.report")
    assert result.returncode == 2
    assert result.stderr.strip() == ("prune_eval.report: error: --pair vanilla visonzip: cell 'visonzip' cannot be "
                                     "used (no such cell)")


def test_explicit_pair_across_question_files_is_not_comparable(tmp_path) -> None:
    """The random split is where the 8910 and 9000 question files differ."""
    for name, version in (("a", "llava-1.5"), ("b", "latest")):
        q = pope_questions(version)[-120:]
        write_cell(tmp_path, name, q, simulate(q, accuracy=0.8, seed=1), budget=64,
                   experiment=experiment_of("visionzip", 64, data=version))
    (c,) = report.analyse(tmp_path, n_resamples=200, pairs=[("a", "b")]).comparisons
    assert c.pair.factor == "explicit" and c.problem.startswith("different question sets: a has 120 questions, b has 120")
    assert c.verdict.endswith("no test was run.")


# ----------------------------------------------------------------------------------------------
# The real sweep, then half of it broken
@pytest.mark.slow
def test_demo_sweep_report_and_half_finished_sweep(tmp_path) -> None:
    result = run_cli(["-m", *FASTPATH_DEMO, "method=vanilla,visionzip,random", "budget=64", "seed=0,1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "demo"
    assert "report: outputs/demo/report/report.md" in result.stdout  # written by the sweep itself
    check_outputs(sweep / "report", ("forest.png", "splits.png"))
    assert not (sweep / "report" / "budget.png").exists()  # one budget: no budget plot
    # vanilla and VisionZip draw no random numbers: one cell each serves both seeds; random has one per seed
    names = sorted(p.name for p in sweep.iterdir() if (p / "cell.json").exists())
    assert [n.split("_toy")[0] for n in names] == ["random-64_seed0", "random-64_seed1", "vanilla-576_anyseed", "visionzip-64_anyseed"]
    assert len(read_csv(sweep / "report" / "cells.csv")) == 4

    partial = next(n for n in names if n.startswith("visionzip-64_anyseed"))
    failed = next(n for n in names if n.startswith("random-64_seed0"))
    (sweep / partial / "summary.json").unlink()
    (sweep / failed / "summary.json").unlink()
    records.atomic_write_json(sweep / failed / "error.json", {"message": "CUDA out of memory\nmore", "traceback": ""})
    plan = json.loads((sweep / "plan.json").read_text())
    plan["cells"]["sparsevlm-64_seed0_never-run"] = {"overrides": [], "aliases": []}
    records.atomic_write_json(sweep / "plan.json", plan)
    again = run_cli([str(sweep), "--resamples", "500"], tmp_path, module="prune_eval.report")
    assert again.returncode == 0, again.stderr
    md = (sweep / "report" / "report.md").read_text()
    assert f"| {partial} | partial | records so far, no summary.json (unfinished or killed) |" in md
    assert f"| {failed} | failed | CUDA out of memory |" in md
    assert "| sparsevlm-64_seed0_never-run | missing | requested in plan.json, nothing written yet |" in md
    assert "Cells: 5 (2 complete, 1 failed, 1 missing, 1 partial)" in md
    statuses = {r["cell"]: r["status"] for r in read_csv(sweep / "report" / "cells.csv")}
    assert statuses[failed] == "failed" and statuses[partial] == "partial"


# ----------------------------------------------------------------------------------------------
# Units: published table, cellfiles
def test_published_lookup_matches_method_version_and_budget() -> None:
    look = published.lookup
    assert look("llava-1.5-7b", "visionzip", None, 64, {}).value == 77.0
    assert look("llava-1.5-7b", "sparsevlm", "v1", 64, {}).value == 75.1
    assert look("llava-1.5-7b", "sparsevlm", "1.5", 64, {"recycling": True}).value == 77.5
    assert look("llava-1.5-7b", "sparsevlm", "v1.5", 96, {}).value == 81.9
    assert look("llava-1.5-7b", "sparsevlm", "v1.5", 64, {"recycling": False}).value == 72.8
    assert look("llava-1.5-7b", "vanilla", None, 576, {}).value == 85.9
    assert look("llava-1.5-7b", "sparsevlm", "v2", 64, {}) is None
    assert look("llava-1.5-13b", "visionzip", None, 64, {}) is None
    assert look("llava-1.5-7b", "visionzip", None, 96, {}) is None
    for entry in published.TABLE:
        source = published.SOURCES[entry.source]
        assert source.arxiv and (source.via.startswith("notes/") or "commit" in source.via)
    assert published.setup_differences({"quant": "int8", "preprocess": "pad", "data": "pope llava-1.5"}) == ["quant int8"]


def test_cell_status_matches_cell_module(tmp_path) -> None:
    """cellfiles.cell_status is the torch-free twin of cell.cell_status (until cell.py imports it)."""
    from prune_eval.execution import cell
    small_cell(tmp_path, "done", "vanilla", accuracy=0.8, sim=0, n=30)
    small_cell(tmp_path, "partial", "vanilla", accuracy=0.8, sim=0, n=30)
    (tmp_path / "partial" / "summary.json").unlink()
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "error.json").write_text("{}")
    for name in ("done", "partial", "failed", "missing"):
        assert cellfiles.cell_status(tmp_path / name) == cell.cell_status(tmp_path / name)
    assert cellfiles.error_message(tmp_path / "failed") == "(error.json unreadable)"


# ----------------------------------------------------------------------------------------------
# Seeds: a configuration computed once serves every seed; gaps over seeds
def test_a_configuration_computed_once_serves_several_seeds(tmp_path) -> None:
    """VisionZip does not use the seed: one cell with "seed": null that plan.json maps seeds 0-4 to.
    SparseVLM v1.5 ran seeds 0 and 1 with different predictions: the gap line gives the gap on each
    seed and the seed + image interval."""
    q = pope_questions("llava-1.5")[:900]
    exp = {**experiment_of("visionzip", 64), "seed": None}
    write_cell(tmp_path, "vz", q, simulate(q, accuracy=0.8, seed=1), experiment=exp, budget=64)
    for s in (0, 1):
        write_cell(tmp_path, f"sv{s}", q, simulate(q, accuracy=0.8, seed=10 + s), budget=64,
                   experiment=experiment_of("sparsevlm", 64, version="v1.5", seed=s))
    plan = {"cells": {"vz": {"overrides": ["method=visionzip", "seed=0"],
                             "aliases": [["method=visionzip", f"seed={s}"] for s in range(1, 5)]},
                      **{f"sv{s}": {"overrides": ["method=sparsevlm", "method.version=v1.5", f"seed={s}"], "aliases": []}
                         for s in (0, 1)}}}
    records.atomic_write_json(tmp_path / "plan.json", plan)
    a = report.analyse(tmp_path, n_resamples=500)
    vz = next(c for c in a.configs if c.info["method"] == "visionzip")
    assert vz.once and a.config_stats[vz.id].seeds.finding == "VisionZip @64 does not use the seed: one computation serves seeds 0–4"
    (c,) = a.comparisons
    assert c.pair.seed_note == "seed 0 of B; A does not use the seed"
    cv = counts_of(tmp_path / "vz")[0]
    cs = [counts_of(tmp_path / f"sv{s}")[0] for s in (0, 1)]
    f1 = lambda x: float(metrics.mean_f1(x.sum(0)))  # noqa: E731
    assert c.seeds.seeds == (0, 1) and c.seeds.gaps == pytest.approx(tuple(f1(cv) - f1(x) for x in cs))
    direct = stats.paired_seed_and_question_interval([cv], cs, metric=metrics.mean_f1, n_resamples=500, rng=0)
    assert (c.seeds.low, c.seeds.high) == (direct.confidence_interval.low, direct.confidence_interval.high)
    assert a.family.source == "plan.json" and a.family.factors == {"method"} and c.family
    md = report.write_report(tmp_path, n_resamples=500).read_text()
    assert "| computed once, serves 5 seeds |" in md
    assert "- C1 VisionZip @64: VisionZip @64 does not use the seed: one computation serves seeds 0–4." in md
    assert "seeds changed predictions, so the interval resamples seeds and images together" in md


def test_yes_ratio_in_both_meanings(tmp_path) -> None:
    q = pope_questions("llava-1.5")[:300]
    answers = ["Yes"] * 200 + ["No"] * 100
    write_cell(tmp_path, "vz", q, answers, experiment=experiment_of("visionzip", 64), budget=64)
    (config,) = report.analyse(tmp_path, n_resamples=100).configs
    md = report.write_report(tmp_path, n_resamples=100).read_text()
    labels_yes = sum(x["label"] == "yes" for x in q) / len(q)
    assert "| pred. yes-ratio | label yes-ratio |" in md
    assert f"| {200 / 300:.3f} | {labels_yes:.3f} |" in md
    assert "which is what lmms-eval's pope task reports as yes_ratio" in md
    rows = read_csv(tmp_path / "report" / "cells.csv")
    assert float(rows[0]["llava/pooled_yes_ratio"]) == pytest.approx(200 / 300)
    assert float(rows[0]["llava/label_yes_ratio"]) == pytest.approx(labels_yes)
