"""Kill campaign: SIGKILL a demo sweep at 50+ moments, resume it, and nothing is lost or wrong.

A two-cell sweep (tiny model, synthetic POPE, 36 questions per cell in two shards of one image, batches
of 6, parts of 12) is run through the real CLI in a subprocess and killed over and over:
- at named points (prune_eval.execution.faults, PRUNE_EVAL_KILL_AT): after the model loads, after a batch,
  half-way through a record part's temporary file, between its fsync and its rename, the same for
  summary.json, report files, plan.json / multirun.yaml / cell.json / model.json; the point and its
  n-th pass are chosen from the work the sweep still has, so every such kill lands;
- at random times after the sweep has launched its cells (whatever nobody named).
Kills come in chains on one sweep directory: each kill is followed by a rerun that resumes from what
the kill left (and may itself be killed), and every chain ends with a rerun that is not killed.

After every kill: every visible part verifies, no question has two records, every record equals
the uninterrupted reference run's record for that question, a summary.json exists only over complete
verified records, no lock is left, plan.json / multirun.yaml / report files are whole. After every
chain: the records equal the reference exactly (no duplicate, missing or truncated record) and the
summaries' metrics, model and data equal the reference's. The test prints the figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from prune_eval.execution import faults, records
from prune_eval.analysis import cellfiles
pytestmark = pytest.mark.slow

SWEEP = ["-m", "experiment=demo", "data.n_images=2", "eval.max_new_tokens=3", "eval.batch_size=6", "eval.part_size=12",
         "eval.shard_images=1", "method=random", "budget=64", "seed=0,1"]
QUESTIONS, BATCH, PART, SHARD = 36, 6, 12, 18  # per cell; a shard is one image's 18 questions
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "HYDRA_FULL_ERROR": "0"}
KILLS = int(os.environ.get("PRUNE_EVAL_CAMPAIGN_KILLS", 50))  # issue 10: at least 50
SEED = int(os.environ.get("PRUNE_EVAL_CAMPAIGN_SEED", 20261124))
LANES = 2  # sweeps killed side by side (CI has 2 cores; each sweep uses one)
RANDOM_SHARE = 0.3
PHASES = ("load", "batch", "part-write", "summary", "report", "other writes", "random")
VOLATILE = {"finished", "seconds", "environment", "config", "records", "timing"}  # differ between any two runs


@dataclass
class Campaign:
    reference: dict[str, dict[str, dict]]  # cell -> key -> record
    reference_summaries: dict[str, dict]
    report_files: int
    tried: Counter = field(default_factory=Counter)  # phase -> runs set up to be killed there
    landed: Counter = field(default_factory=Counter)  # phase -> runs that died by SIGKILL
    random_landed_in: Counter = field(default_factory=Counter)
    recovered: int = 0
    chains: int = 0
    completions_checked: int = 0
    invariant_checks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def total_landed(self) -> int:
        with self.lock:
            return sum(self.landed.values())


class Sweeps:
    """Runs `python -m prune_eval SWEEP name=...` as forked children of one pre-imported server
    (tests/forked_cli.py): the same process a fresh interpreter would run, minus 4 s of imports."""

    def __init__(self) -> None:
        self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forked_cli.py"))], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
        assert json.loads(self.server.stdout.readline()) == {"ready": True}

    def start(self, cwd: Path, name: str, log: Path, kill_at: str | None) -> int:
        env = {k: v for k, v in {**os.environ, **ENV}.items() if k != faults.KILL_AT}
        if kill_at:
            env[faults.KILL_AT] = kill_at
        request = {"cwd": str(cwd), "args": [*SWEEP, f"name={name}"], "env": env, "log": str(log)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())["pid"]

    def wait(self) -> int:
        """The last started sweep's exit status (-9: SIGKILL)."""
        return json.loads(self.server.stdout.readline())["returncode"]

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""  # the child creates it after the fork


def launched(log: Path) -> bool:
    """The sweeper has planned the cells (its first log line); composition is over."""
    return "job(s) ->" in read_log(log)


def timed_kill(pid: int, log: Path, delay: float) -> str:
    """SIGKILL the sweep `delay` seconds after it planned its cells; where it landed (from its log)."""
    deadline = time.time() + 300
    while not launched(log) and alive(pid) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    text = read_log(log)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "finished first"
    started, finished = text.count("questions to answer"), text.count(" complete: mean F1")
    return "cell computing" if started > finished else "report" if "sweep outputs" in text else "between cells"


def phase_of(point: str) -> str:
    name = point.split(":")[0]
    for prefix, phase in (("load", "load"), ("batch", "batch"), ("part-", "part-write"), ("summary-", "summary"), ("report-", "report")):
        if name.startswith(prefix):
            return phase
    return "other writes"


# ------------------------------------------------------------------------------------------------
# What a kill may leave, and what a finished chain must hold
def sweep_cells(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "cell.json").exists()) if sweep_dir.is_dir() else []


def check_after_kill(campaign: Campaign, sweep_dir: Path, context: str) -> None:
    for cell in sweep_cells(sweep_dir):
        where = f"{context}: {cell.name}"
        assert cell.name in campaign.reference, f"{where}: a cell the reference run does not have"
        assert cellfiles.cell_status(cell) != "busy", f"{where}: lock still held after the kill"
        assert not list((cell / "records").glob("*.bad-*")), f"{where}: a part failed verification"
        read = records.read_records(cell)
        assert read.bad_parts == [] and read.conflicts == [], f"{where}: {read.bad_parts or read.conflicts}"
        lines = sum(len(records.read_part(p)) for p in records.part_paths(cell))
        assert lines == len(read.records), f"{where}: a question has two records"
        expected = campaign.reference[cell.name]
        for record in read.records:
            assert record == expected[record["key"]], f"{where}: record {record['key']} differs from the uninterrupted run"
        if (cell / "summary.json").exists():
            loaded = cellfiles.load_cell(cell)
            assert not isinstance(loaded, str), f"{where}: summary.json over unverifiable records: {loaded}"
            assert len(loaded.keys) == QUESTIONS, f"{where}: summary.json before every question was answered"
    for name in ("plan.json",):
        if (sweep_dir / name).exists():
            assert json.loads((sweep_dir / name).read_text())["cells"], f"{context}: {name}"
    if (sweep_dir / "multirun.yaml").exists():
        assert "hydra" in yaml.safe_load((sweep_dir / "multirun.yaml").read_text()), f"{context}: multirun.yaml"
    for path in (sweep_dir / "report").glob("*") if (sweep_dir / "report").is_dir() else ():
        if path.name.startswith("."):
            continue  # a killed write's temporary file: never read
        data = path.read_bytes()
        whole = data.endswith(b"IEND\xaeB`\x82") if path.suffix == ".png" else data.endswith(b"\n") and data.decode("utf-8")
        assert whole, f"{context}: report file {path.name} is not whole"
    with campaign.lock:
        campaign.invariant_checks += 1


def check_finished(campaign: Campaign, sweep_dir: Path, context: str) -> None:
    check_after_kill(campaign, sweep_dir, context)
    cells = {c.name: c for c in sweep_cells(sweep_dir)}
    assert sorted(cells) == sorted(campaign.reference), f"{context}: cells {sorted(cells)}"
    for name, cell in cells.items():
        got = {r["key"]: r for r in records.read_records(cell).records}
        assert got == campaign.reference[name], f"{context}: {name}: records differ from the uninterrupted run"
        summary = json.loads((cell / "summary.json").read_text())
        assert comparable(summary) == comparable(campaign.reference_summaries[name]), f"{context}: {name}: summary differs"
        assert not list(cell.glob(".*.tmp")) and not list((cell / "records").glob(".*.tmp")), f"{context}: stale temporary files"
    assert (sweep_dir / "report" / "report.md").exists(), f"{context}: no report"
    with campaign.lock:
        campaign.completions_checked += 1


def comparable(summary: dict) -> dict:
    out = {k: v for k, v in summary.items() if k not in VOLATILE}
    out["model"] = {k: v for k, v in (summary.get("model") or {}).items() if k != "load_seconds"}
    return out


# ------------------------------------------------------------------------------------------------
# Choosing where to kill next: a named point the remaining work is sure to pass
def remaining_work(sweep_dir: Path, reference: dict[str, dict[str, dict]], report_files: int) -> dict[str, int]:
    """How many passes each kill point will see in the next (uninterrupted) run. Answers are written
    shard by shard (one image each), a shard's parts of 12 then its rest; the sweep's one process
    loads the model once, for the first cell with questions left (a resident model)."""
    computing = batches = parts = summaries = new_cells = 0
    for name in sorted(reference):
        cell = sweep_dir / name
        if cellfiles.read_summary(cell) is not None:
            continue
        answered = Counter(r["image"] for r in records.read_records(cell).records) if cell.is_dir() else Counter()
        images = {r["image"] for r in reference[name].values()}
        summaries += 1
        new_cells += not (cell / "cell.json").exists()
        lefts = [SHARD - answered[image] for image in images]
        if any(lefts):
            computing += 1
            batches += sum(-(-left // BATCH) for left in lefts)
            parts += sum(-(-left // PART) for left in lefts)
    work = {"load": min(computing, 1), "batch": batches, "part-mid-write": parts, "part-before-rename": parts,
            "model-before-rename": computing, "summary-mid-write": summaries, "summary-before-rename": summaries,
            "cell-mid-write": new_cells, "plan-before-rename": 1, "multirun-mid-write": 1,
            "report-mid-write": report_files, "report-before-rename": report_files}
    return {point: n for point, n in work.items() if n}


def choose_kill(campaign: Campaign, work: dict[str, int], rng: random.Random) -> tuple[str | None, str]:
    """(PRUNE_EVAL_KILL_AT or None for a timed kill, phase): the least-tried phase that can land."""
    if rng.random() < RANDOM_SHARE:
        return None, "random"
    by_phase: dict[str, list[str]] = {}
    for point in work:
        by_phase.setdefault(phase_of(point), []).append(point)
    with campaign.lock:
        fewest = min(campaign.tried[p] for p in by_phase)
    phase = rng.choice(sorted(p for p in by_phase if campaign.tried[p] == fewest))
    point = rng.choice(sorted(by_phase[phase]))
    return f"{point}:{rng.randint(1, work[point])}", phase


def calibrate(sweeps: Sweeps, campaign: Campaign, root: Path, name: str) -> tuple[float, float]:
    """An uninterrupted forked run: (seconds computing the cells, seconds from the last cell to exit),
    from which timed kills draw their delays. Its records must equal the reference's too."""
    log = root / f"{name}.log"
    pid = sweeps.start(root, name, log, None)
    while not launched(log) and alive(pid):
        time.sleep(0.01)
    launch = cells_done = time.time()
    while alive(pid):
        if read_log(log).count(" complete: mean F1") < len(campaign.reference):
            cells_done = time.time()
        time.sleep(0.01)
    assert sweeps.wait() == 0, read_log(log)[-3000:]
    check_finished(campaign, root / "outputs" / name, name)
    return cells_done - launch, time.time() - cells_done


def lane(campaign: Campaign, root: Path, index: int, quota: int, errors: list) -> None:
    rng = random.Random(SEED + index)
    cell_names = sorted(campaign.reference)
    landed, chain = 0, 0
    sweeps = Sweeps()
    try:
        cells_s, tail_s = calibrate(sweeps, campaign, root, f"lane{index}-calibration")
        while landed < quota:
            chain += 1
            name = f"lane{index}-chain{chain}"
            sweep_dir, chain_kills, chain_landed = root / "outputs" / name, rng.randint(3, 6), 0
            for k in range(chain_kills):
                if landed >= quota:
                    break
                work = remaining_work(sweep_dir, campaign.reference, campaign.report_files)
                spec, phase = choose_kill(campaign, work, rng)
                log = root / f"{name}-{k}.log"
                pid = sweeps.start(root, name, log, spec)
                share = work.get("batch", 0) * BATCH / (QUESTIONS * len(cell_names))  # of the cells' work still to do
                where = timed_kill(pid, log, rng.uniform(0, cells_s * share + tail_s)) if spec is None else spec
                returncode = sweeps.wait()
                hit = returncode == -signal.SIGKILL
                assert hit or returncode == 0, f"{name} run {k} ({spec}) exit {returncode}:\n{log.read_text()[-3000:]}"
                with campaign.lock:
                    campaign.tried[phase] += 1
                    campaign.landed[phase] += hit
                    if hit and spec is None:
                        campaign.random_landed_in[where] += 1
                landed += hit
                chain_landed += hit
                if hit:
                    check_after_kill(campaign, sweep_dir, f"{name} after kill {k} ({where})")
            log = root / f"{name}-final.log"
            sweeps.start(root, name, log, None)
            returncode = sweeps.wait()
            assert returncode == 0, f"{name}: the rerun after the kills failed:\n{log.read_text()[-3000:]}"
            check_finished(campaign, sweep_dir, name)
            with campaign.lock:
                campaign.chains += 1
                campaign.recovered += chain_landed
    except BaseException as e:  # reported by the main thread
        errors.append(e)
    finally:
        sweeps.close()


@pytest.mark.timeout(900)
def test_kill_anywhere_then_resume_loses_nothing(tmp_path) -> None:
    started = time.time()
    log = tmp_path / "reference.log"
    with open(log, "w") as out:  # the reference: a plain `python -m prune_eval`, never killed
        process = subprocess.Popen([sys.executable, "-m", "prune_eval", *SWEEP, "name=reference"], cwd=tmp_path,
                                   env={**os.environ, **ENV}, stdout=out, stderr=subprocess.STDOUT)
    process.wait(timeout=300)
    assert process.returncode == 0, log.read_text()[-3000:]
    reference_dir = tmp_path / "outputs" / "reference"
    cells = sweep_cells(reference_dir)
    assert len(cells) == 2
    campaign = Campaign(
        reference={c.name: {r["key"]: r for r in records.read_records(c).records} for c in cells},
        reference_summaries={c.name: json.loads((c / "summary.json").read_text()) for c in cells},
        report_files=len(list((reference_dir / "report").iterdir())),
    )
    assert all(len(r) == QUESTIONS for r in campaign.reference.values())

    errors: list[BaseException] = []
    quotas = [KILLS // LANES + (i < KILLS % LANES) for i in range(LANES)]
    threads = [threading.Thread(target=lane, args=(campaign, tmp_path, i, q, errors)) for i, q in enumerate(quotas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]

    landed = campaign.total_landed()
    lines = [
        f"kill campaign: {sum(campaign.tried.values())} kills tried, {landed} landed (SIGKILL), {campaign.recovered} recovered, "
        f"{landed - campaign.recovered} lost; {campaign.chains} chains each ended by an unkilled rerun; "
        f"{campaign.invariant_checks} state checks; {time.time() - started:.0f} s",
        "  landed by phase: " + ", ".join(f"{p} {campaign.landed[p]}/{campaign.tried[p]}" for p in PHASES),
        "  random kills landed while: " + ", ".join(f"{w} {n}" for w, n in sorted(campaign.random_landed_in.items())),
    ]
    print("\n" + "\n".join(lines))
    assert landed >= KILLS and campaign.recovered == landed
    assert all(campaign.landed[p] > 0 for p in PHASES if p != "random"), campaign.landed
