"""Results are verifiable, and what cannot be verified is reported, not used.

A cell's parts carry footers (count + sha256) and summary.json lists every part's sha256; the report
(cellfiles.load_cell) checks both. A resumed cell moves an unverifiable part aside and answers its
questions again. A model that produces NaN/inf logits fails its cell with one clear line instead of
recording argmax-of-NaN answers. A full disk fails the write that hit it, leaves no half file, and
the cell resumes once there is room. Cells run in-process here (the demo's toy model, 18 questions).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_DEMO
from hydra import compose, initialize_config_dir

from prune_eval.execution import faults, records
from prune_eval.analysis import cellfiles, report
from prune_eval.execution import sweep
from prune_eval.execution.cell import cell_lock, run_cell
from prune_eval.config import CONF_DIR, plan_cell
from prune_eval.errors import PruneEvalError
from prune_eval.models.llm import check_finite

SMALL = [*FAST_DEMO, "data.n_images=1"]  # 18 questions, 3 parts of 6


def demo_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*SMALL, *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[object, Path, list[dict]]:
    """One complete cell, computed once: (config, cell directory, its records sorted by key)."""
    cfg = demo_cfg()
    cell = tmp_path_factory.mktemp("finished") / plan_cell(cfg).name
    assert run_cell(cfg, cell) == "complete"
    return cfg, cell, sorted(records.read_records(cell).records, key=lambda r: r["key"])


def copy_cell(source: Path, target_root: Path) -> Path:
    target = target_root / source.name
    (target / "records").mkdir(parents=True)
    for path in [*source.glob("*.json"), *records.part_paths(source)]:
        (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def reencode(part: Path, edit) -> None:
    """Rewrite a part with edited records and a *valid* footer: only summary.json can tell."""
    rows = records.read_part(part)
    part.write_bytes(records.encode_part([edit(dict(r)) for r in rows]))


# ------------------------------------------------------------------------------------------------
# Tampering after the summary was written: reported by the report, never used
def flip(record: dict) -> dict:
    answer = "No" if record["pred_llava"] == "yes" else "Yes"
    return {**record, "raw_answer": answer, "pred_llava": answer.lower(), "pred_exact": answer.lower()}


TAMPERING = {
    "part edited in place": (lambda cell: (cell / "records/part-00001.jsonl").write_bytes(
        (cell / "records/part-00001.jsonl").read_bytes().replace(b'"label": "yes"', b'"label": "no"', 1)),
        "part part-00001.jsonl failed verification: checksum mismatch"),
    "part rewritten with a valid footer": (lambda cell: reencode(cell / "records/part-00001.jsonl", flip),
                                           "part-00001.jsonl changed after summary.json was written (sha256 differs)"),
    "part truncated": (lambda cell: (cell / "records/part-00002.jsonl").write_bytes((cell / "records/part-00002.jsonl").read_bytes()[:-30]),
                       "part part-00002.jsonl failed verification: truncated"),
    "part cut at a line end": (lambda cell: (cell / "records/part-00000.jsonl").write_bytes(
        b"".join((cell / "records/part-00000.jsonl").read_bytes().splitlines(keepends=True)[:-2])),
        "part part-00000.jsonl failed verification: no footer line"),
    "part deleted": (lambda cell: (cell / "records/part-00001.jsonl").unlink(),
                     "summary.json says 18 questions but the records hold 12"),
    "extra part added later": (lambda cell: records.write_part(cell, [flip(r) for r in records.read_part(cell / "records/part-00000.jsonl")]),
                               "answered twice with different records"),
    "extra identical part added later": (lambda cell: records.write_part(cell, records.read_part(cell / "records/part-00000.jsonl")),
                                         "record parts differ from those listed in summary.json (extra: ['part-00003.jsonl']"),
    "summary n_questions edited": (lambda cell: edit_summary(cell, n_questions=17), "summary.json says 17 questions but the records hold 18"),
    "summary part list removed": (lambda cell: edit_summary(cell, records=None), "summary.json lists no record parts"),
    "summary part list malformed": (lambda cell: edit_summary(cell, records=[{"file": ["x"]}]), "malformed entry(ies) in 'records'"),
    "summary sha256 edited": (lambda cell: edit_summary(cell, records=[{**e, "sha256": "0" * 64} if e["file"].endswith("1.jsonl") else e
                                                                       for e in json.loads((cell / "summary.json").read_text())["records"]]),
                              "part-00001.jsonl changed after summary.json was written"),
    "record with a wrong type": (lambda cell: reencode(cell / "records/part-00001.jsonl", lambda r: {**r, "split": ["random"]}),
                                 "wrong type(s) split=['random']"),
}


def edit_summary(cell: Path, **changes) -> None:
    summary = json.loads((cell / "summary.json").read_text())
    records.atomic_write_json(cell / "summary.json", {**summary, **changes})


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_tampered_cell_is_reported_not_used(case, finished, tmp_path) -> None:
    tamper, expected = TAMPERING[case]
    _, source, _ = finished
    cell = copy_cell(source, tmp_path)
    assert not isinstance(cellfiles.load_cell(cell), str)
    tamper(cell)
    why = cellfiles.load_cell(cell)
    assert isinstance(why, str) and expected in why, why
    (entry,) = report.inventory(tmp_path)
    assert entry.status == "excluded" and entry.cell is None and expected in entry.note


# ------------------------------------------------------------------------------------------------
# Resume: an unverifiable part is moved aside and its questions answered again
def test_resume_quarantines_a_corrupt_part_and_recomputes_it(finished, tmp_path) -> None:
    cfg, source, expected = finished
    cell = copy_cell(source, tmp_path)
    (cell / "summary.json").unlink()
    bad = cell / "records" / "part-00001.jsonl"
    bad.write_bytes(bad.read_bytes()[:-50])
    (cell / "records" / ".part-00009.jsonl.abc.tmp").write_bytes(b'{"half": ')  # a killed write's leftover
    assert cellfiles.cell_status(cell) == "partial"
    assert run_cell(cfg, cell) == "complete"
    moved = list((cell / "records").glob("part-00001.jsonl.bad-*"))
    assert len(moved) == 1, "the corrupt part is kept for inspection"
    assert [p.name for p in records.part_paths(cell)] == ["part-00000.jsonl", "part-00002.jsonl", "part-00003.jsonl"]
    assert not list((cell / "records").glob(".*.tmp")), "stale temporary files are removed under the lock"
    loaded = cellfiles.load_cell(cell)
    assert not isinstance(loaded, str), loaded
    assert sorted(records.read_records(cell).records, key=lambda r: r["key"]) == expected
    assert json.loads((cell / "summary.json").read_text())["model"]["source"] == "toy"


def test_summary_keeps_the_model_info_when_only_the_summary_was_missing(finished, tmp_path) -> None:
    """A kill after the last part but before summary.json: the rerun loads no model, yet the
    summary still says which model answered (model.json, written at load time)."""
    cfg, source, _ = finished
    cell = copy_cell(source, tmp_path)
    expected = json.loads((cell / "summary.json").read_text())["model"]
    (cell / "summary.json").unlink()
    assert run_cell(cfg, cell) == "complete"
    assert json.loads((cell / "summary.json").read_text())["model"] == expected


# ------------------------------------------------------------------------------------------------
# NaN / inf logits: a clear error in the cell, never argmax(NaN) = token 0
class BrokenHead(torch.nn.Module):
    """lm_head whose logits are NaN (or +inf) where `index` says (everywhere by default)."""

    def __init__(self, head, value: float = float("nan"), index=slice(None)) -> None:
        super().__init__()
        self.head, self.value, self.index = head, value, index

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).clone()
        logits[self.index] = self.value
        return logits


def broken_bundle(bundle, **kwargs):
    return dataclasses.replace(bundle, lm=dataclasses.replace(bundle.lm, lm_head=BrokenHead(bundle.lm.lm_head, **kwargs)))


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error_not_an_answer(tiny_bundle, fast, value) -> None:
    from prune_eval.data.synthetic import make_questions
    from prune_eval.data.images import synthetic_loader
    from prune_eval.execution.engine import EvalSettings, evaluate_reference
    from prune_eval.execution.fast import evaluate_fast
    from prune_eval.methods import get_method

    questions = make_questions(1, seed=0, splits=("random",))
    settings = EvalSettings(batch_size=6, max_new_tokens=3, stop_when_decided=True, fast=fast)
    evaluate = evaluate_fast if fast else evaluate_reference
    answers = []
    with pytest.raises(PruneEvalError, match=r"NaN/inf logits for \d+ of \d+ question"):
        evaluate(broken_bundle(tiny_bundle, value=value), get_method("vanilla"), {"visual_tokens": 576}, questions, synthetic_loader(),
                 preprocess="pad", settings=settings, seed=0, on_answers=answers.extend)
    assert answers == []


def test_argmax_of_nan_is_what_the_check_prevents() -> None:
    logits = torch.tensor([[0.1, float("nan"), 0.3], [0.5, 0.2, 0.1], [float("-inf")] * 3])
    assert logits.argmax(-1).tolist() == [1, 0, 0]  # silently "answers" for rows 0 and 2
    with pytest.raises(PruneEvalError, match="for 2 of 3 question"):
        check_finite(logits)
    check_finite(logits, torch.tensor([False, True, False]))  # finished or padding rows are not looked at
    check_finite(torch.tensor([[0.0, float("-inf"), 1.0]]))  # -inf for some tokens is a mask, not an error


def test_a_cell_whose_model_produces_nan_fails_with_one_line(tmp_path, monkeypatch) -> None:
    from prune_eval.models import loading

    real_load = loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: broken_bundle(real_load(*a, **k), index=(..., 0)))
    cfg = demo_cfg()
    cell = tmp_path / plan_cell(cfg).name
    assert run_cell(cfg, cell) == "failed"
    message = cellfiles.error_message(cell)
    assert message == json.loads((cell / "error.json").read_text())["message"], "one line"
    assert message.startswith("the model produced NaN/inf logits") and "quant=bf16" in message
    assert records.part_paths(cell) == [] and cellfiles.cell_status(cell) == "failed"


# ------------------------------------------------------------------------------------------------
# A full disk
@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """Make atomic writes under tmp_path hit ENOSPC (a real one: the temporary file is /dev/full).
    `limit[kind]` = how many writes of that kind ('part', 'summary', 'error', ...) still succeed."""
    real = tempfile.mkstemp
    limit: dict[str, int] = {}

    def mkstemp(*, dir, prefix, suffix):
        fd, path = real(dir=dir, prefix=prefix, suffix=suffix)
        kind = faults.write_kind(Path(dir) / prefix.lstrip(".").rsplit(".", 1)[0])
        if Path(dir).is_relative_to(tmp_path) and kind in limit:
            if limit[kind] == 0:
                os.close(fd)
                return os.open("/dev/full", os.O_WRONLY), path
            limit[kind] -= 1
        return fd, path

    monkeypatch.setattr(records.tempfile, "mkstemp", mkstemp)
    return limit


def test_disk_full_leaves_the_old_file_and_no_temporary(full_disk, tmp_path) -> None:
    target = tmp_path / "summary.json"
    records.atomic_write_json(target, {"old": True})
    full_disk["summary"] = 0
    with pytest.raises(PruneEvalError, match=r"cannot write .*summary.json: No space left on device \(errno 28\)"):
        records.atomic_write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_disk_full_mid_cell_fails_it_cleanly_and_the_rerun_completes(full_disk, finished, tmp_path) -> None:
    cfg, _, expected = finished
    cell = tmp_path / plan_cell(cfg).name
    full_disk["part"] = 1  # the first part fits, the second does not
    assert run_cell(cfg, cell) == "failed"
    message = cellfiles.error_message(cell)
    assert "part-00001.jsonl: No space left on device" in message
    assert [p.name for p in records.part_paths(cell)] == ["part-00000.jsonl"] and not list((cell / "records").glob(".*"))
    assert records.read_records(cell).bad_parts == []

    full_disk["part"], full_disk["error"] = 0, 0  # still full: error.json cannot be written either
    assert run_cell(cfg, cell) == "failed"  # logged, no exception
    full_disk.clear()  # room again
    assert run_cell(cfg, cell) == "complete"
    assert sorted(records.read_records(cell).records, key=lambda r: r["key"]) == expected
    assert not (cell / "error.json").exists()


# ------------------------------------------------------------------------------------------------
# The fault hook itself, the lock and plan.json under concurrency
def test_kill_hook_fires_at_the_nth_pass_only() -> None:
    code = "from prune_eval.execution import faults\nfor i in range(5):\n    print(i, flush=True)\n    faults.checkpoint('batch')\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, faults.KILL_AT: "batch:3"})
    assert run.returncode == -9 and run.stdout.split() == ["0", "1", "2"]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, faults.KILL_AT: "load:1"})
    assert run.returncode == 0 and run.stdout.split() == ["0", "1", "2", "3", "4"]
    assert [faults.write_kind(Path(p)) for p in ("c/records/part-00001.jsonl", "s/report/report.md", "s/c/summary.json", "s/plan.json")] == \
        ["part", "report", "summary", "plan"]


def test_a_status_probe_does_not_make_a_cell_look_busy(tmp_path) -> None:
    """cellfiles.is_locked (the report, another sweep's status table) holds the lock briefly; a
    process starting the cell at that moment must still get it, not skip the cell as busy."""
    cell = tmp_path / "cell"
    cell.mkdir()
    probe = open(cell / cellfiles.LOCK, "a+")
    import fcntl

    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.15, lambda: fcntl.flock(probe, fcntl.LOCK_UN)).start()
    with cell_lock(cell) as acquired:
        assert acquired
        assert cellfiles.is_locked(cell) and cellfiles.cell_status(cell) == "busy"
    probe.close()
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl,time; f=open({str(cell / cellfiles.LOCK)!r},'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.time()
        with cell_lock(cell) as acquired:
            assert not acquired
        assert time.time() - started < 2
    finally:
        holder.kill()
        holder.wait()


def test_concurrent_plan_updates_keep_every_cell(tmp_path) -> None:
    """Two sweeps that start at once both record their cells in plan.json (read-merge-write is locked)."""
    def add(prefix: str) -> None:
        for i in range(25):
            sweep.record_plan(tmp_path, [sweep.PlannedCell(f"{prefix}-{i}", [f"seed={i}"])])

    threads = [threading.Thread(target=add, args=(p,)) for p in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sweep.requested_cells(tmp_path)) == 75


def test_unreadable_plan_is_one_line(tmp_path) -> None:
    (tmp_path / "plan.json").write_text('{"cells": {"a": ')
    with pytest.raises(PruneEvalError, match=r"plan.json is unreadable .*; fix or remove it"):
        sweep.record_plan(tmp_path, [sweep.PlannedCell("x", [])])


def test_a_part_changed_right_after_it_was_verified_is_read_again(tmp_path) -> None:
    """Verified parts are remembered by their bytes' SHA-256, not by file name or time stamps: a byte
    flipped in place a moment after a read (same size, same coarse mtime) is still caught."""
    record = {"schema_version": 2, "key": "random/1", "split": "random", "question_id": 1, "image": "a.jpg", "label": "yes",
              "question": "Is there a dog in the image?", "raw_answer": "Yes", "pred_llava": "yes", "pred_exact": "yes",
              "visual_tokens": 64, "new_tokens": 1, "stop_reason": "eos"}
    path = records.write_part(tmp_path, [record], {"path": "fast"})
    first, footer = records.read_part_and_footer(path)
    again, _ = records.read_part_and_footer(path)
    assert first == again == [record] and footer["numerics"] == {"path": "fast"}
    data = bytearray(path.read_bytes())
    data[data.index(b'"Yes"') + 1] = ord("N")  # "Yes" -> "Nes": same size
    path.write_bytes(bytes(data))
    with pytest.raises(records.BadPart, match="checksum mismatch"):
        records.read_part_and_footer(path)
