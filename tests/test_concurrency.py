"""Two sweeps on one sweep directory at once, and the report while a sweep writes: no corruption.

The protocol under test: a cell is computed under an exclusive flock on `<cell>/.lock`; a second
sweep that finds it held leaves the cell alone and says "busy" (the kernel drops the lock of a dead
process, so nothing stays busy). plan.json is read, merged and written under `<sweep>/.plan.lock`;
every file is written atomically (temporary file + rename), so a reader sees the old or the new
file, never a half. The report uses only complete cells whose records verify against their summary.
Real CLI processes, side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import FAST_DEMO

from prune_eval.execution import records
from prune_eval.analysis import cellfiles, report
from prune_eval.errors import PruneEvalError

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
SWEEP = [*FAST_DEMO, "data.n_images=2", "method=random", "budget=64"]


def sweep(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prune_eval", "-m", *SWEEP, *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_cells(sweep_dir: Path, expected: int) -> dict[str, Path]:
    cells = {p.name: p for p in sweep_dir.iterdir() if (p / "cell.json").exists()}
    assert len(cells) == expected
    for cell in cells.values():
        loaded = cellfiles.load_cell(cell)
        assert not isinstance(loaded, str), f"{cell.name}: {loaded}"
        lines = sum(len(records.read_part(p)) for p in records.part_paths(cell))
        assert lines == len(loaded.keys) == 36, f"{cell.name}: {lines} records for {len(loaded.keys)} questions"
    return cells


@pytest.mark.timeout(600)
def test_two_sweeps_at_once_on_one_directory(tmp_path) -> None:
    """A wants seeds 0,1,2 and B seeds 0,1,3, started together, in that order: each cell is computed
    exactly once; a sweep that finds a cell locked by the other leaves it to it (a warning), and if the
    other is still at it when this sweep ends, its table says 'busy' with the other's pid (exit 1)."""
    a, b = sweep(tmp_path, "seed=0,1,2"), sweep(tmp_path, "seed=0,1,3")
    (a_out, a_err), (b_out, b_err) = a.communicate(timeout=300), b.communicate(timeout=300)
    busy = []
    for name, process, out, err in (("A", a, a_out, a_err), ("B", b, b_out, b_err)):
        assert process.returncode in (0, 1), f"sweep {name}: {err[-3000:]}"
        assert "Traceback" not in err and "failed:" not in out and "\nfailed " not in out, out + err[-3000:]  # no failure listed or in the table
        lines = [line for line in out.splitlines() if line.startswith("  busy: ")]
        assert (process.returncode == 1) == bool(lines), out  # exit 1 only for cells left to the other sweep
        assert all("being computed by another process (pid " in line and "rerun this sweep" in line for line in lines), lines
        busy += lines
    sweep_dir = tmp_path / "outputs" / "demo"
    cells = check_cells(sweep_dir, 4)
    logs = a_out + a_err + b_out + b_err
    for name in cells:
        assert logs.count(f"cell {name}: 36 of 36 questions to answer") == 1, f"{name} computed more than once"
    assert sorted(json.loads((sweep_dir / "plan.json").read_text())["cells"]) == sorted(cells), "plan.json lost a sweep's cells"
    assert yaml.safe_load((sweep_dir / "multirun.yaml").read_text())["hydra"]
    skipped = logs.count("is being computed by another process; left alone")
    again = sweep(tmp_path, "seed=0,1,2,3")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "4 were already complete" in out, out + err[-2000:]
    print(f"\nconcurrent sweeps: exit codes A={a.returncode} B={b.returncode}; {skipped} cell(s) found locked by the other sweep and "
          f"left to it, {len(busy)} still busy when a sweep ended; "
          "each of the 4 cells computed once; plan.json lists all 4; a rerun finds all complete")


@pytest.mark.timeout(600)
def test_report_while_a_sweep_writes(tmp_path) -> None:
    """The report, run over and over while a sweep writes parts and summaries, never uses a cell
    that is not complete and verified, never fails, and never makes the sweep skip a cell."""
    process = sweep(tmp_path, "seed=0,1", "eval.part_size=6")
    sweep_dir = tmp_path / "outputs" / "demo"
    seen: dict[str, int] = {}
    reports, cli_reports = 0, []
    while process.poll() is None:
        if not sweep_dir.is_dir() or not any(sweep_dir.iterdir()):
            time.sleep(0.01)
            continue
        try:
            entries = report.inventory(sweep_dir)
        except PruneEvalError as e:  # only before the first cell directory exists
            assert "holds no cells" in str(e)
            continue
        reports += 1
        for entry in entries:
            seen[entry.status] = seen.get(entry.status, 0) + 1
            assert entry.status in ("complete", "busy", "missing"), f"{entry.name}: {entry.status}: {entry.note}"
            if entry.status == "complete":
                assert len(entry.cell.data.keys) == 36
        if reports % 40 == 1 and len(cli_reports) < 2:  # the report command itself, writing report/ beside the sweep's own
            cli_reports.append(subprocess.Popen([sys.executable, "-m", "prune_eval.report", str(sweep_dir), "--resamples", "200"],
                                                cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out, err = process.communicate()
    assert process.returncode == 0, out + err[-3000:]
    assert "2 cell(s) 2 complete" in out and "busy" not in out, out
    for cli in cli_reports:
        cli_out, cli_err = cli.communicate(timeout=300)
        assert cli.returncode == 0 and "Traceback" not in cli_err, cli_err[-3000:]
    check_cells(sweep_dir, 2)
    final = {e.name: e.status for e in report.inventory(sweep_dir)}
    assert set(final.values()) == {"complete"}
    print(f"\nreport during a sweep: {reports} inventories while it wrote ({seen}), {len(cli_reports)} report commands; "
          "no cell used before it was complete and verified; the sweep finished every cell")


def test_join_takes_a_cell_alone_beside_its_answerers_or_not_at_all(tmp_path) -> None:
    """CellLock.join: exclusive on a free cell; shared at once beside a process answering a set-up
    cell; exclusive after a status probe's moment; None after a second of an exclusive holder."""
    import fcntl
    import threading
    import time

    from prune_eval.execution.cell import CELL_FILE, LOCK, LOCK_RETRY_S, LOCK_TRIES, CellLock

    cell = tmp_path / "cell"
    lock = CellLock(cell)
    assert lock.join() is True
    lock.close()
    (cell / CELL_FILE).write_text("{}")
    other = open(cell / LOCK, "a+")  # another open file: flock sees another holder, as another process
    fcntl.flock(other, fcntl.LOCK_SH)
    started, lock = time.monotonic(), CellLock(cell)
    assert lock.join() is False and time.monotonic() - started < 10 * LOCK_RETRY_S
    lock.close()
    fcntl.flock(other, fcntl.LOCK_EX)
    started, lock = time.monotonic(), CellLock(cell)
    assert lock.join() is None and time.monotonic() - started >= 2 * LOCK_TRIES * LOCK_RETRY_S * 0.9
    lock.close()
    threading.Timer(0.1, lambda: fcntl.flock(other, fcntl.LOCK_UN)).start()  # a probe lets go
    lock = CellLock(cell)
    assert lock.join() is True
    lock.close()
    other.close()


def test_join_lets_go_of_a_shared_lock_on_a_cell_nobody_set_up(tmp_path) -> None:
    """A status probe held the exclusive lock at the first try and let go before the shared try: on a
    cell without cell.json that shared lock is released, and the next attempt takes the cell alone
    to set it up (it would otherwise "help" a cell nobody answers)."""
    import fcntl

    from prune_eval.execution.cell import CellLock

    lock = CellLock(tmp_path / "cell")
    real, tries = lock.try_take, []

    def probe_at_first_try(mode: int) -> bool:
        tries.append(mode)
        return False if len(tries) == 1 else real(mode)

    lock.try_take = probe_at_first_try
    assert lock.join() is True and tries == [fcntl.LOCK_EX, fcntl.LOCK_SH, fcntl.LOCK_EX]
    lock.close()
