"""Agreement with vanilla, the compression-sensitive subset, and FastV's published numbers (issue 22,
the report side), from cells written in the record format with the method names and parameters that
`method=downsample` and `method=fastv` record. Every number is checked against a direct
computation from the records."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FASTPATH_DEMO, run_cli
from test_report import experiment_of, pope_questions, read_csv, simulate, write_cell

from prune_eval.execution import records
from prune_eval.analysis import analyse, metrics, published, report, stats

QUESTIONS = pope_questions("llava-1.5")
SUBSET = [q for q in QUESTIONS if q["image"] in set(sorted({q["image"] for q in QUESTIONS})[:90])]
RESAMPLES = 500


def experiment(method: str, params: dict) -> dict:
    exp = experiment_of("vanilla", 64)
    exp["method"] = {"name": method, "version": "1", "params": params}
    return exp


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agreement")
    cells = {
        "vanilla": (experiment_of("vanilla", 576), 0.87),
        "downsample-64": (experiment("downsample", {"visual_tokens": 64, "grid": [8, 8]}), 0.76),
        "fastv-64": (experiment("fastv", {"budget": 64, "budget_rule": "layer_average", "kept_tokens": 30, "k": 2,
                                          "visual_tokens": 576}), 0.70),
        "visionzip-64": (experiment_of("visionzip", 64), 0.80),
        "sparsevlm-64": (experiment_of("sparsevlm", 64, version="v1.5"), 0.81),
    }
    for k, (name, (exp, accuracy)) in enumerate(cells.items()):
        write_cell(folder, name, SUBSET, simulate(SUBSET, accuracy=accuracy, seed=100 + k), experiment=exp, budget=64)
    return folder


@pytest.fixture(scope="module")
def analysed(sweep):
    return analyse.analyse(sweep, n_resamples=RESAMPLES, seed=0)


def predictions(cell) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = sorted(records.read_records(cell).records, key=lambda r: r["key"])
    return (np.array([r["pred_llava"] for r in rows]), np.array([r["label"] for r in rows]), np.array([r["image"] for r in rows]))


def test_agreement_with_vanilla_is_the_records(sweep, analysed) -> None:
    vanilla, label, images = predictions(sweep / "vanilla")
    assert set(analysed.agreements) == {"downsample-64", "fastv-64", "visionzip-64", "sparsevlm-64"}
    for name, g in analysed.agreements.items():
        mine, _, _ = predictions(sweep / name)
        equal, r2w, w2r = mine == vanilla, (vanilla == label) & (mine != label), (vanilla != label) & (mine == label)
        assert g.vanilla_cell == "vanilla" and g.n_questions == len(label) and g.n_images == 90
        assert (g.equal.estimate, g.right_to_wrong.estimate, g.wrong_to_right.estimate) == pytest.approx((equal.mean(), r2w.mean(), w2r.mean()))
        # accuracy(cell) - accuracy(vanilla) = (wrong -> right) - (right -> wrong), exactly
        assert (mine == label).mean() - (vanilla == label).mean() == pytest.approx(w2r.mean() - r2w.mean())
        direct = stats.cluster_share_interval(equal, images, n_resamples=RESAMPLES, rng=0)
        assert g.equal.confidence_interval == direct.confidence_interval
        assert 0 <= g.right_to_wrong.confidence_interval.low <= g.right_to_wrong.estimate <= g.right_to_wrong.confidence_interval.high <= 1


def test_compression_sensitive_subset_scores_and_gaps(sweep, analysed) -> None:
    vanilla, label, images = predictions(sweep / "vanilla")
    down, _, _ = predictions(sweep / "downsample-64")
    mask = (vanilla == label) & (down != label)
    assert mask.sum() > 30
    for name in ("fastv-64", "visionzip-64", "sparsevlm-64", "downsample-64"):
        s = analysed.subsets[name]
        mine, _, _ = predictions(sweep / name)
        assert (s.vanilla_cell, s.downsample_cell) == ("vanilla", "downsample-64")
        assert s.n_questions == mask.sum() and s.n_images == len(set(images[mask]))
        assert s.accuracy.estimate == pytest.approx((mine[mask] == label[mask]).mean())
    assert analysed.subsets["downsample-64"].accuracy.estimate == 0  # by construction
    (c,) = [c for c in analysed.comparisons if {c.pair.a.label, c.pair.b.label} == {"VisionZip @64", "SparseVLM v1.5 @64"}]
    acc_gap, f1_gap = c.subset
    clusters = np.unique(images[mask])

    def subset_counts(name):
        rs = sorted(records.read_records(sweep / name).records, key=lambda r: r["key"])
        keep = [r for r, m in zip(rs, mask) if m]
        return metrics.cluster_counts([r["label"] for r in keep], [r["pred_llava"] for r in keep], [r["split"] for r in keep],
                                      [r["image"] for r in keep], ("adversarial", "popular", "random"), clusters)

    a, b = subset_counts("visionzip-64"), subset_counts("sparsevlm-64")
    direct = stats.paired_cluster_bootstrap(a, b, metric=metrics.pooled_accuracy, n_resamples=RESAMPLES, rng=0)
    assert acc_gap.key == "subset/pooled_accuracy" and acc_gap.estimate == pytest.approx(direct.estimate)
    assert (acc_gap.low, acc_gap.high) == pytest.approx((direct.confidence_interval.low, direct.confidence_interval.high))
    assert f1_gap.estimate == pytest.approx(float(metrics.mean_f1(a.sum(0)) - metrics.mean_f1(b.sum(0))))
    assert acc_gap.data == f"subset, {mask.sum()} q / {len(clusters)} images" and "compression-sensitive subset" in acc_gap.label


def test_report_and_cells_csv_show_agreement_subset_and_fastv(sweep) -> None:
    path = report.write_report(sweep, n_resamples=RESAMPLES)
    md = path.read_text()
    for heading in ("### Agreement with vanilla", "### Compression-sensitive subset", "### Gaps on the compression-sensitive subset"):
        assert heading in md
    rows = {r["cell"]: r for r in read_csv(path.parent / "cells.csv")}
    vanilla, label, _ = predictions(sweep / "vanilla")
    mine, _, _ = predictions(sweep / "fastv-64")
    assert float(rows["fastv-64"]["agree"]) == pytest.approx((mine == vanilla).mean())
    assert rows["fastv-64"]["vanilla_cell"] == "vanilla" and rows["vanilla"]["agree"] == ""
    assert rows["visionzip-64"]["subset_downsample_cell"] == "downsample-64"
    # FastV matched with both tables that print it, and reconciled against VisionZip's Table 1
    fastv_row = next(line for line in md.splitlines() if line.startswith("| C") and "| FastV @64 | fastv | 48.0 |" in line)
    assert "| visionzip-t1, sparsevlm-v1-t1 |" in fastv_row
    assert "### #" in md and "VisionZip @64 vs FastV @64: published +29.00" in md
    assert "sparsevlm-v1-t1: Zhang et al., SparseVLM (arXiv v1, 2024-10), Table 1 (LLaVA-1.5-7B) (arXiv:2410.04417; read from the " \
           "official project page leofan90/SparseVLMs.github.io, index.html at commit 4776f93 (2024-10-13))" in md


def test_published_fastv_rows_and_their_sources() -> None:
    for budget, value in ((192, 64.8), (128, 59.6), (64, 48.0)):
        entry = published.lookup("llava-1.5-7b-original", "fastv", None, budget, {"budget_rule": "layer_average"})
        assert entry.value == value and published.sources_of(entry) == ["visionzip-t1", "sparsevlm-v1-t1"]
        # the tables' FastV budgets are 32-layer averages: a cell keeping `budget` tokens from layer K on is another setting
        assert published.lookup("llava-1.5-7b-original", "fastv", None, budget, {"budget_rule": "kept"}) is None
    a, b = published.published_pair("visionzip", "fastv", 64)
    assert (a.value, b.value, a.source) == (77.0, 48.0, "visionzip-t1")
    a, b = published.published_pair("visionzip", "sparsevlm", 64)
    assert (b.version, b.value) == ("v1", 75.1)
    assert published.versions_published("sparsevlm") == ["v1", "v1.5"]


@pytest.mark.slow
def test_a_toy_sweep_of_five_methods_renders_agreement_and_subset_from_its_records(tmp_path) -> None:
    """Issue 22's check through the real CLI: `method=vanilla,downsample,visionzip,sparsevlm,fastv
    budget=64` on the toy; agreement and subset rows equal a direct computation from the records."""
    done = run_cli(["-m", *FASTPATH_DEMO, "method=vanilla,downsample,visionzip,sparsevlm,fastv", "budget=64"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    sweep = tmp_path / "outputs" / "demo"
    cell = {p.name.split("_")[0]: p for p in sweep.iterdir() if (p / "summary.json").exists()}
    assert set(cell) == {"vanilla-576", "downsample-64", "visionzip-64", "sparsevlm-v1.5-64", "fastv-64"}
    analysed = analyse.analyse(sweep, n_resamples=RESAMPLES, seed=0)
    vanilla, label, _ = predictions(cell["vanilla-576"])
    down, _, _ = predictions(cell["downsample-64"])
    mask = (vanilla == label) & (down != label)
    assert mask.sum() > 0, "the toy's downsample baseline gets no vanilla-correct question wrong: no subset to test"
    assert set(analysed.agreements) == {cell[m].name for m in ("downsample-64", "visionzip-64", "sparsevlm-v1.5-64", "fastv-64")}
    for method in ("downsample-64", "visionzip-64", "sparsevlm-v1.5-64", "fastv-64"):
        mine, _, _ = predictions(cell[method])
        g, s = analysed.agreements[cell[method].name], analysed.subsets[cell[method].name]
        assert g.vanilla_cell == cell["vanilla-576"].name and g.n_questions == len(label)
        assert (g.equal.estimate, g.right_to_wrong.estimate, g.wrong_to_right.estimate) == pytest.approx(
            ((mine == vanilla).mean(), ((vanilla == label) & (mine != label)).mean(), ((vanilla != label) & (mine == label)).mean()))
        assert s.downsample_cell == cell["downsample-64"].name and s.n_questions == mask.sum()
        assert s.accuracy.estimate == pytest.approx((mine[mask] == label[mask]).mean())
    md = (sweep / "report" / "report.md").read_text()
    assert "### Agreement with vanilla" in md and "### Compression-sensitive subset" in md
