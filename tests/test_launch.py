"""Launching without SLURM: GPU selection, the local-gpus scheduler, the SLURM watcher's rules (with a
fake squeue), bad launcher input through the real CLI, and a real `launch=local-gpus` sweep on the
CPU (cells pinned to GPU ids handed out by the launcher; a fake nvidia-smi marks one GPU busy).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import FAST_DEMO, FASTPATH_DEMO, run_cli

from prune_eval.errors import PruneEvalError
from prune_eval.execution import checks, events, local, records, slurm, sweep
from prune_eval.execution.checks import GpuInfo
from prune_eval.execution.schedule import CellJob
from prune_eval.execution.slurm import TaskState
from prune_eval.execution.watching import Launched, Progress

NVIDIA_SMI_OUTPUT = "0, GPU-aaaa, 3\n1, GPU-bbbb, 5\n2, GPU-cccc, 30000\n"


def gpus(*memory: float) -> list[GpuInfo]:
    return [GpuInfo(str(i), f"GPU-{i}", m) for i, m in enumerate(memory)]


def no_torch() -> int:
    return 0


# ----------------------------------------------------------------------------- GPU selection

def test_each_local_gpus_cell_sees_its_gpu_as_cuda_0() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:0"):
        checks.check_device_for_one_gpu(device)
    with pytest.raises(PruneEvalError, match="device=cuda:1 with launch=local-gpus: each cell sees only its own GPU"):
        checks.check_device_for_one_gpu("cuda:1")


def test_parse_gpu_query_reads_nvidia_smi_csv() -> None:
    parsed = checks.parse_gpu_query(NVIDIA_SMI_OUTPUT + "3, GPU-dddd, [N/A]\nnot a row\n")
    assert [g.index for g in parsed] == ["0", "1", "2", "3"]
    assert parsed[2] == GpuInfo("2", "GPU-cccc", 30000.0) and parsed[3].memory_used_mib is None


def test_visible_gpus_prefers_cuda_visible_devices_then_nvidia_smi_then_torch() -> None:
    assert checks.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, lambda: gpus(0, 0, 0, 0), no_torch)[0] == ["2", "3"]
    assert checks.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, lambda: gpus(0), no_torch)[0] == []
    assert checks.visible_gpus({}, lambda: gpus(0, 0), no_torch)[0] == ["0", "1"]
    assert checks.visible_gpus({}, lambda: None, lambda: 3)[0] == ["0", "1", "2"]
    ids, source = checks.visible_gpus({}, lambda: None, no_torch)
    assert ids == [] and "nvidia-smi is not available" in source


def test_gpu_pool_takes_all_or_a_list_and_skips_busy_gpus() -> None:
    query = lambda: gpus(3, 5, 30000)  # noqa: E731
    assert checks.gpu_pool("all", env={}, query=query, torch_count=no_torch) == ["0", "1", "2"]
    assert checks.gpu_pool([1, 0], env={}, query=query, torch_count=no_torch) == ["1", "0"]
    assert checks.gpu_pool("0,2", env={}, query=query, torch_count=no_torch) == ["0", "2"]
    assert checks.gpu_pool(["GPU-1"], env={}, query=query, torch_count=no_torch) == ["GPU-1"]
    assert checks.busy_gpus(["0", "1", "2"], query(), 1024) == {"2": 30000.0}


@pytest.mark.parametrize(
    ("requested", "env", "message"),
    [
        ("all", {"CUDA_VISIBLE_DEVICES": ""}, "launch=local-gpus found no GPU (CUDA_VISIBLE_DEVICES=''"),
        ([0], {"CUDA_VISIBLE_DEVICES": ""}, "launch.gpus=[0]: no GPU found on this machine"),
        ([0, 7], {}, "unknown GPU id '7' in launch.gpus; GPUs here (nvidia-smi): 0, 1, 2"),
        ([0, 0], {}, "launch.gpus lists GPU 0 twice"),
        ([], {}, "launch.gpus is empty"),
        ([2], {}, "every GPU in launch.gpus is in use by another process: 2 (30000 MiB used)"),
    ],
)
def test_gpu_pool_errors_name_the_bad_value(requested, env, message) -> None:
    with pytest.raises(PruneEvalError) as e:
        checks.gpu_pool(requested, env=env, query=lambda: gpus(3, 5, 30000), torch_count=no_torch)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the local-gpus dispatcher, with fake workers

def job(tmp_path: Path, name: str, cost: float, model: str = "A", shards: int = 1) -> CellJob:
    cell = tmp_path / name
    cell.mkdir(exist_ok=True)
    return CellJob(name, (), str(cell), 0, model, cost, 10, shards)


class FakeWorker:
    """A resident worker as the dispatcher sees it: ready after one poll; answers a cell in cost/10
    polls and writes its summary; loads a model whenever a cell needs another one than it holds;
    dies (SIGKILL) on the cells named in `die_on`."""

    def __init__(self, gpu: str, job_id: str, log: Path, die_on: set[str], jobs: dict[str, CellJob], ledger: list) -> None:
        self.gpu, self.job_id, self.die_on, self.jobs, self.ledger = gpu, job_id, die_on, jobs, ledger
        self.polls, self.ready_sent, self.code, self.model = 0, False, None, None
        self.current: tuple[str, int] | None = None

    def send(self, cell: CellJob) -> None:
        assert self.current is None, f"{self.job_id} got {cell.name} while busy"
        if cell.model_key != self.model:
            self.model = cell.model_key
            self.ledger.append(("load", self.job_id, self.gpu, cell.model_key))
        self.ledger.append(("run", self.job_id, self.gpu, cell.name))
        self.current = (cell.name, max(1, int(cell.cost // 10)))

    def replies(self) -> list[dict]:
        if self.code is not None:
            return []
        if not self.ready_sent:
            self.ready_sent = True
            return [{"ready": True}]
        if self.current is None:
            return []
        name, left = self.current
        if left > 1:
            self.current = (name, left - 1)
            return []
        self.current = None
        if name in self.die_on:
            self.code = -9
            return []
        (Path(self.jobs[name].cell_dir) / "summary.json").write_text(json.dumps({"status": "complete"}))
        return [{"done": name, "status": "complete"}]

    def exit_code(self):
        return self.code

    def stop(self) -> None:
        self.code = 0 if self.code is None else self.code

    def interrupt(self) -> None:
        self.code = -2

    def fileno(self):
        return None


def dispatch(tmp_path, jobs, pool, *, busy_rounds=0, die_on=()):
    ledger: list[tuple] = []
    by_name = {j.name: j for j in jobs}
    busy = iter([True] * busy_rounds)

    def query():
        return gpus(*[30000 if g == "1" and next(busy, False) else 0 for g in ("0", "1", "2")])

    lines: list[str] = []
    dispatcher = local.Dispatcher(jobs, pool, lambda gpu, job_id, log: FakeWorker(gpu, job_id, log, set(die_on), by_name, ledger),
                                  tmp_path, poll_s=0, progress=Progress("local-gpus", 3600, lines.append), query=query)
    dispatcher.wait = lambda timeout: None
    return dispatcher.run(), ledger, lines


def test_dispatcher_keeps_each_model_on_its_worker_and_waits_for_a_busy_gpu(tmp_path) -> None:
    jobs = [job(tmp_path, "a1", 50), job(tmp_path, "b1", 40, "B"), job(tmp_path, "a2", 30), job(tmp_path, "a3", 20), job(tmp_path, "b2", 10, "B")]
    outcomes, ledger, lines = dispatch(tmp_path, jobs, ["0", "1"], busy_rounds=3)
    assert outcomes == ["complete"] * 5
    runs = [(worker, gpu, cell) for kind, worker, gpu, cell in ledger if kind == "run"]
    assert runs[0] == ("local-0", "0", "a1")  # GPU 1 was busy: the first worker, and the longest cell, on GPU 0
    assert {gpu for _, gpu, _ in runs} == {"0", "1"}
    loads = [(worker, model) for kind, worker, _, model in ledger if kind == "load"]
    assert len(loads) == 2 and len(set(loads)) == 2, loads  # each worker loaded one model, once
    by_worker = {w: {cell[0] for ww, _, cell in runs if ww == w} for w, _ in loads}
    assert by_worker == {"local-0": {"a"}, "local-1": {"b"}}, runs  # a model's cells stayed on the worker holding it
    assert lines[-1].startswith("cells: 5 complete, 0 running, 0 failed, 0 pending")


def test_dispatcher_records_a_dead_workers_cell_and_replaces_the_worker(tmp_path) -> None:
    jobs = [job(tmp_path, f"c{i}", 30) for i in range(4)]
    outcomes, ledger, lines = dispatch(tmp_path, jobs, ["0"], die_on={"c1"})
    assert outcomes == ["complete", "died", "complete", "complete"]
    error = json.loads((tmp_path / "c1" / "error.json").read_text())
    assert error["type"] == "JobDied" and "local worker local-0 (GPU 0) exited with signal SIGKILL before the cell finished" in error["message"]
    assert str(tmp_path / "local-0_gpu0_log.out") in error["message"]
    assert [w for kind, w, _, _ in ledger if kind == "load"] == ["local-0", "local-1"]  # the replacement loads again, once
    assert "1 died" in lines[-1]


class Quiet:
    def send(self, job) -> None:
        pass


def test_an_idle_worker_helps_the_running_cell_with_the_most_work_per_worker(tmp_path) -> None:
    big, small = job(tmp_path, "big", 80, shards=4), job(tmp_path, "small", 10, shards=4)
    dispatcher = local.Dispatcher([big, small], ["0", "1", "2"], lambda *a: Quiet(), tmp_path, skip_busy=False)
    slots = [local.Slot(str(g), f"local-{g}", tmp_path / str(g), Quiet(), ready=True) for g in range(6)]
    assert dispatcher.choose(slots[0]) == big
    dispatcher.send(slots[0], big)
    assert dispatcher.choose(slots[1]) == small  # a pending cell before any helping
    dispatcher.send(slots[1], small)
    assert dispatcher.workers_wanted() == 3  # both cells have free shards; three GPUs
    assert dispatcher.choose(slots[2]) == big  # 80 s on one worker beats 10 s on one
    dispatcher.send(slots[2], big)
    dispatcher.send(slots[3], big)
    assert dispatcher.free_shards("big") == 1 and dispatcher.choose(slots[4]) == big  # 80 s / 4 workers still beats 10 s / 2
    dispatcher.send(slots[4], big)
    assert dispatcher.free_shards("big") == 0 and dispatcher.choose(slots[5]) == small  # no free shard left in big
    dispatcher.finish(slots[0], "big", "unused")
    assert dispatcher.choose(slots[0]) == small  # never sent back to a cell it already worked on
    assert dispatcher.watched["big"].outcome is None  # others still answer it


# ----------------------------------------------------------------------------- the SLURM watcher, with a fake squeue

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def watch(jobs, timeline, clock, cancelled=None, lost_after_s=10.0):
    """Run watch_slurm with squeue answers taken from `timeline` (a list, one dict per poll)."""
    answers = iter(timeline)
    last = {}

    def squeue(_ids):
        nonlocal last
        step = next(answers, last)
        if callable(step):
            step = step()
        last = step
        return step

    lines: list[str] = []
    out = slurm.watch_slurm(jobs, poll_s=1, lost_after_s=lost_after_s, progress=Progress("slurm 7", 3600, lines.append, clock),
                                squeue=squeue, cancel=(cancelled.extend if cancelled is not None else lambda ids: None),
                                clock=clock, sleep=clock.sleep)
    return out, lines


def complete(cell: Path) -> dict:
    (cell / "summary.json").write_text(json.dumps({"status": "complete"}))
    return {}


def test_watcher_survives_a_requeue_and_reports_the_cell_complete(tmp_path) -> None:
    cell = tmp_path / "c0"
    cell.mkdir()
    job = Launched(cell, job_id="7_0")
    clock = FakeClock()
    timeline = [{"7_0": TaskState("PENDING", "Priority")}, {"7_0": TaskState("RUNNING")}, {}, {"7_0": TaskState("PREEMPTED")},
                {"7_0": TaskState("PENDING", "BeginTime")}, {"7_0": TaskState("RUNNING")}, lambda: complete(cell)]
    outcomes, lines = watch([job], timeline, clock)
    assert outcomes == ["complete"] and not (cell / "error.json").exists()
    assert any("0 complete, 1 running" in line for line in lines) and "1 complete" in lines[-1]


def test_watcher_declares_a_vanished_task_dead_after_the_grace_period(tmp_path) -> None:
    cells = [tmp_path / f"c{i}" for i in range(3)]
    for c in cells:
        c.mkdir()
    (cells[2] / "error.json").write_text('{"message": "old failure"}')  # from an earlier sweep
    jobs = [Launched(c, job_id=f"7_{i}", log=tmp_path / f"7_{i}_0_log.err") for i, c in enumerate(cells)]
    clock = FakeClock()

    def failing_cell_writes_its_error():
        (cells[1] / "error.json").write_text('{"message": "bad image"}')
        return {"7_0": TaskState("FAILED", "NonZeroExitCode"), "7_1": TaskState("COMPLETED"), "7_2": TaskState("CANCELLED")}

    timeline = [{j.job_id: TaskState("RUNNING") for j in jobs}, failing_cell_writes_its_error]
    outcomes, _ = watch(jobs, timeline, clock, lost_after_s=10)
    assert outcomes == ["died", "failed", "died"]
    assert 10 <= clock.now <= 13  # died only after the grace period, then promptly
    died = json.loads((cells[0] / "error.json").read_text())
    assert died["type"] == "JobDied" and "SLURM task 7_0 ended (FAILED) before the cell finished" in died["message"]
    assert str(tmp_path / "7_0_0_log.err") in died["message"]
    assert json.loads((cells[1] / "error.json").read_text())["message"] == "bad image"  # the cell's own error is kept
    assert "7_2 ended (CANCELLED)" in json.loads((cells[2] / "error.json").read_text())["message"]


def test_watcher_cancels_a_task_slurm_can_never_start(tmp_path) -> None:
    cell = tmp_path / "c0"
    cell.mkdir()
    clock = FakeClock()
    cancelled: list[str] = []
    outcomes, lines = watch([Launched(cell, job_id="7_0")], [{"7_0": TaskState("PENDING", "PartitionConfig")}], clock, cancelled)
    assert outcomes == ["died"] and cancelled == ["7_0"]
    assert "(1 pending: PartitionConfig)" in lines[0]
    assert "reason PartitionConfig" in json.loads((cell / "error.json").read_text())["message"]


# ----------------------------------------------------------------------------- SLURM checks (fake sinfo)

def fake_run(partitions: str, nodes: str):
    def run(args, **kwargs):
        stdout = partitions if args[-1] == "%P" else nodes
        return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr="")
    return run


def test_time_limits_and_gres_parse() -> None:
    assert checks.parse_time_limit_min("1-02:00:00") == 1560
    assert checks.parse_time_limit_min("4:00:00") == 240 and checks.parse_time_limit_min("30:00") == 30
    assert checks.parse_time_limit_min("infinite") is None
    assert checks.gres_gpus("gpu:a100:8(S:0-1),shard:8") == 8 and checks.gres_gpus("(null)") == 0


@pytest.mark.parametrize(
    ("partition", "request_", "message"),
    [
        ("gpux", checks.SlurmRequest(), "unknown SLURM partition (launch.partition) 'gpux'; did you mean 'gpu'? choices: cpu, gpu"),
        (None, checks.SlurmRequest(gpus=1), "launch.gpus=1 is more than any node of partition 'cpu' has (at most 0 GPUs); set launch.gpus=null"),
        ("gpu", checks.SlurmRequest(cpus=64), "launch.cpus=64 is more than any node of partition 'gpu' has (at most 32 CPUs)"),
        ("gpu", checks.SlurmRequest(time_min=600), "launch.time_min=600 exceeds the 480-minute limit of partition 'gpu'"),
    ],
)
def test_check_slurm_finds_bad_partitions_and_requests(partition, request_, message) -> None:
    nodes = {"gpu": "32|500000|gpu:h100:4(S:0-1)|8:00:00\n", "cpu": "16|64000|(null)|infinite\n"}

    def run(args, **kwargs):
        stdout = "cpu*\ngpu\n" if args[-1] == "%P" else nodes[args[args.index("-p") + 1]]
        return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr="")

    with pytest.raises(PruneEvalError) as e:
        checks.check_slurm(partition, request_, which=lambda c: f"/usr/bin/{c}", run=run)
    assert message in str(e.value)
    checks.check_slurm("gpu", checks.SlurmRequest(cpus=8, mem_gb=64, gpus=1, time_min=240), which=lambda c: c, run=run)


def test_check_slurm_needs_sbatch() -> None:
    with pytest.raises(PruneEvalError, match="launch=slurm needs `sbatch`, which is not on PATH"):
        checks.check_slurm(None, which=lambda c: None, run=fake_run("", ""))


def test_sweep_dir_override_quotes_the_path() -> None:
    assert sweep.sweep_dir_override(Path("/a/b c/it's")) == "hydra.sweep.dir='/a/b c/it\\'s'"


# ----------------------------------------------------------------------------- through the CLI

def fake_nvidia_smi(tmp_path: Path) -> dict[str, str]:
    """An env whose PATH starts with a fake nvidia-smi: GPUs 0-2, GPU 2 busy (30000 MiB used)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    rows = NVIDIA_SMI_OUTPUT.replace("\n", "\\n")
    script.write_text(f"#!/bin/sh\nprintf '{rows}'\n")
    script.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    return env


def no_cuda_env(tmp_path: Path) -> dict[str, str]:
    env = fake_nvidia_smi(tmp_path)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


BAD_INPUT = [
    (["launch=slurmm"], "plain", "unknown launch 'slurmm'; did you mean 'slurm'?"),
    (["launch=local-gpus"], "no-cuda", "launch=local-gpus found no GPU (CUDA_VISIBLE_DEVICES=''"),
    (["launch=local-gpus", "launch.gpus=[0,5]"], "fake-smi", "unknown GPU id '5' in launch.gpus; GPUs here (nvidia-smi): 0, 1, 2"),
    (["launch=local-gpus", "launch.gpus=0,1"], "fake-smi", "launch.gpus=0,1 sweeps over a launcher setting, which all cells share; for a list write launch.gpus=[0,1]"),
    (["launch=slurm"], "no-sbatch", "launch=slurm needs `sbatch`, which is not on PATH"),
    # workers were started from the command line (GPUs 0-2) before the bad budget was found: ended, no log left
    (["launch=local-gpus", "budget=64,10000"], "fake-smi", "2 of 4 job(s) are invalid; nothing was launched"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("args", "env_kind", "message"), BAD_INPUT, ids=[" ".join(b[0]) for b in BAD_INPUT])
def test_bad_launcher_input_is_one_line_before_anything_runs(tmp_path, args, env_kind, message) -> None:
    env = {"fake-smi": fake_nvidia_smi, "no-cuda": no_cuda_env}.get(env_kind, lambda p: {})(tmp_path)
    if env_kind == "no-sbatch":
        env = {"PATH": str(tmp_path / "empty-bin")}  # python is started by its absolute path
    result = run_cli(["-m", *FAST_DEMO, "method=vanilla", "seed=0,1", *args], tmp_path, env={**env, "TMPDIR": str(tmp_path)}, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("prune_eval: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not list(tmp_path.glob("outputs/demo/*/launches.jsonl")) and not list(tmp_path.glob("outputs/demo/*/records"))
    assert not (tmp_path / "outputs" / "demo" / "plan.json").exists() and not (tmp_path / "outputs" / "demo" / "multirun.yaml").exists()
    assert not list(tmp_path.glob("prune-eval-worker-gpu*"))  # early workers' logs (TMPDIR below)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_refused_launch_leaves_plan_json_untouched_also_when_every_cell_is_complete(tmp_path) -> None:
    """launch=slurm without sbatch after a finished sweep: refused in one line, for a new seed (a cell
    that would have been planned) and for the complete one (nothing left to launch) alike; plan.json
    and multirun.yaml keep their bytes, so the report lists no phantom "missing" cell."""
    done = run_cli(["-m", *FAST_DEMO, "data.n_images=1", "method=vanilla", "seed=0"], tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    sweep = tmp_path / "outputs" / "demo"
    before = {name: (sweep / name).read_bytes() for name in ("plan.json", "multirun.yaml")}
    for seeds in ("5", "0"):
        refused = run_cli(["-m", *FAST_DEMO, "data.n_images=1", "method=vanilla", f"seed={seeds}", "launch=slurm"], tmp_path,
                          env={"PATH": str(tmp_path / "empty-bin")}, timeout=120)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        errors = [line for line in refused.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "launch=slurm needs `sbatch`" in errors[0], refused.stderr[-2000:]
        assert {name: (sweep / name).read_bytes() for name in before} == before
    assert len(json.loads(before["plan.json"])["cells"]) == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_gpus_sweep_runs_one_cell_per_gpu_and_skips_the_busy_one(tmp_path) -> None:
    env = fake_nvidia_smi(tmp_path)
    env["CUDA_VISIBLE_DEVICES"] = "0,1,2"
    result = run_cli(["-m", *FASTPATH_DEMO, "launch=local-gpus", "method=random", "budget=64", "seed=0,1,2,3", "launch.progress_s=2"],
                     tmp_path, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launching 4 cell(s) on GPU(s) 0, 1, 2" in result.stdout
    assert "cells: 4 complete, 0 running, 0 failed, 0 pending" in result.stdout
    assert "GPU 2 is in use by another process" in result.stdout + result.stderr
    sweep = tmp_path / "outputs" / "demo"
    cells = sorted(p for p in sweep.iterdir() if (p / "cell.json").exists())
    assert len(cells) == 4
    runs = []
    for cell in cells:
        assert json.loads((cell / "summary.json").read_text())["status"] == "complete"
        lines = events.read_events(cell)
        assert [e["event"] for e in lines] == ["start", "computed", "end"] and lines[-1]["status"] == "complete"
        runs.append((lines[0]["gpu"], lines[0]["time"], lines[-1]["time"], lines[0]["job_id"], lines[1]["load_s"]))
    assert {gpu for gpu, *_ in runs} == {"0", "1"}  # never the busy GPU 2; both free GPUs used
    for gpu in ("0", "1"):
        intervals = sorted((s, e) for g, s, e, *_ in runs if g == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:])), intervals
    workers = {job_id for *_, job_id, _ in runs}
    for worker in workers:  # resident: each worker loaded the model for its first cell only
        assert sum(load_s > 0 for *_, job_id, load_s in runs if job_id == worker) == 1, runs
    assert len(workers) == 2 and "resident worker per GPU" in result.stdout
    worker_logs = list(sweep.glob(".submitit/local-*/local-*_log.out"))  # both started while the sweep was planned
    assert len(worker_logs) == 2 and all("worker started before the sweep was planned" in p.read_text() for p in worker_logs)
    assert not list(Path(tempfile.gettempdir()).glob("prune-eval-worker-gpu*"))  # their early logs moved, none left
    rerun = run_cli(["-m", *FASTPATH_DEMO, "launch=local-gpus", "method=random", "budget=64", "seed=0,1,2,3"], tmp_path, env=env, timeout=120)
    assert rerun.returncode == 0 and "4 were already complete" in rerun.stdout and "launching 4" not in rerun.stdout
    assert not list(Path(tempfile.gettempdir()).glob("prune-eval-worker-gpu*"))  # the early workers it did not need are gone


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_local_gpus_workers_share_one_large_cell_by_shards(tmp_path) -> None:
    """One cell of 8 shards on two GPUs: both workers start at once and answer different shards;
    each question is answered once and the cell has one summary."""
    env = fake_nvidia_smi(tmp_path)
    env["CUDA_VISIBLE_DEVICES"] = "0,1"
    result = run_cli(["-m", *FAST_DEMO, "data.n_images=8", "eval.shard_images=1", "launch=local-gpus", "method=random", "budget=64"],
                     tmp_path, env=env, timeout=360)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (cell,) = [p for p in (tmp_path / "outputs" / "demo").iterdir() if (p / "cell.json").exists()]
    timing = json.loads((cell / "summary.json").read_text())["timing"]
    assert timing["workers"] == ["local-0", "local-1"] and timing["shards"] == 8 and timing["questions_computed"] == 8 * 18
    read = records.read_records(cell)
    assert not read.conflicts and sum(len(records.read_part(p)) for p in records.part_paths(cell)) == len(read.records) == 8 * 18
    shards = sorted(e["shard"] for e in events.read_events(cell) if e["event"] == "computed")
    assert shards == list(range(8)) and timing["loads"] == 2  # one load per worker


BOOM_LAUNCHER = """
from hydra.plugins.launcher import Launcher


class BoomLauncher(Launcher):
    def __init__(self, **params):  # launch=local's profile passes its settings (progress_s)
        pass

    def setup(self, *, hydra_context, task_function, config):
        pass

    def launch(self, job_overrides, initial_job_idx):
        raise RuntimeError("job 17 died and the launcher gave up")
"""


def test_a_launcher_that_breaks_still_gets_the_status_table_and_report(tmp_path) -> None:
    plugins = tmp_path / "path" / "hydra_plugins"  # Hydra takes launchers from the hydra_plugins namespace only
    plugins.mkdir(parents=True)
    (plugins / "boom_launcher.py").write_text(BOOM_LAUNCHER)
    result = run_cli(["-m", *FAST_DEMO, "method=random", "budget=64", "seed=0,1", "hydra.launcher._target_=hydra_plugins.boom_launcher.BoomLauncher"],
                     tmp_path, env={"PYTHONPATH": str(tmp_path / "path")}, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "launcher failed: RuntimeError: job 17 died and the launcher gave up" in output
    assert "sweep outputs/demo: 2 cell(s) 2 missing" in result.stdout
    if importlib.util.find_spec("prune_eval.analysis.report") is not None:
        assert "report: " in result.stdout


def test_local_worker_module_runs_a_pickled_call(tmp_path) -> None:
    """The local-gpus worker entry point (`python -m prune_eval.execution.worker <pickle>`)."""
    from submitit.helpers import DelayedSubmission

    path = tmp_path / "job.pkl"
    DelayedSubmission(Path.write_text, tmp_path / "out.txt", "ran").dump(path)
    subprocess.run([sys.executable, "-m", "prune_eval.execution.worker", str(path)], check=True, timeout=60)
    assert (tmp_path / "out.txt").read_text() == "ran"


def test_a_prestarted_worker_is_adopted_with_its_log_or_discarded(tmp_path) -> None:
    """launch=local-gpus starts workers before it plans the sweep (their imports overlap the
    planning): one adopted later runs the sweep's pickled call and its early output moves to the
    log the launcher names; one the sweep does not need is killed and leaves no file behind."""
    from submitit.helpers import DelayedSubmission

    from prune_eval.execution.local import ProcessWorker

    pickle_path = tmp_path / "job.pkl"
    DelayedSubmission(Path.write_text, tmp_path / "out.txt", "ran").dump(pickle_path)
    early_log, unused_log, final_log = tmp_path / "early.log", tmp_path / "unused.log", tmp_path / "worker.log"
    adopted = ProcessWorker(None, early_log, "0", None)
    unused = ProcessWorker(None, unused_log, "1", None)
    unused.discard()
    assert unused.exit_code() is not None and not unused_log.exists()
    adopted.adopt(pickle_path, final_log, "local-0")
    assert adopted.process.wait(timeout=120) == 0
    assert (tmp_path / "out.txt").read_text() == "ran"
    assert not early_log.exists() and "worker started before the sweep was planned: imports took" in final_log.read_text()
    idle = ProcessWorker(None, tmp_path / "idle.log", "0", None)
    idle.stop()  # stdin closed before any adopt line (the sweep ended, or died): it ends, removing its log
    assert idle.process.wait(timeout=120) == 0 and not (tmp_path / "idle.log").exists()


def test_workers_start_from_the_command_line_and_the_launcher_corrects_their_gpus(tmp_path, monkeypatch) -> None:
    """`-m ... launch=local-gpus` starts waiting workers before anything else (prune_eval.__main__),
    on the GPUs the command line's launch.* settings give (launch/local-gpus.yaml's otherwise); a
    later prestart for another GPU set ends those outside it; nothing starts for a command line
    that cannot say (no -m, another launcher, a swept or bad launch.gpus); ended workers leave no log."""
    from prune_eval.__main__ import prestart_from_command_line

    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path)["PATH"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert not local._prestarted
    try:
        for args in (["launch=local-gpus"], ["-m", "launch=local"], ["-m", "launch=local-gpus", "launch.gpus=0,1"],
                     ["-m", "launch=local-gpus", "launch.gpus=[0,7]"], ["-m", "launch=local-gpus", "launch.gpus=[0"],
                     ["-m", "launch=local-gpus", "--cfg", "job"]):
            prestart_from_command_line(args)
            assert not local._prestarted, args
        prestart_from_command_line(["-m", "method=vanilla", "launch=local-gpus"])
        assert sorted(local._prestarted) == ["0", "1", "2"]  # as the launcher's pool: a busy GPU gets its worker once it is free
        first = dict(local._prestarted)
        prestart_from_command_line(["-m", "launch=local-gpus", "launch.gpus=[1,2]"])
        assert sorted(local._prestarted) == ["1", "2"] and local._prestarted["1"] is first["1"]
        assert first["0"].exit_code() is not None and not first["0"].early_log.exists()
        local.prestart_for(["2"])  # what the launcher's prestart does with the pool its checks found
        assert list(local._prestarted) == ["2"] and first["1"].exit_code() is not None
    finally:
        left = list(local._prestarted.values())
        local.discard_prestarted()
    assert all(worker.exit_code() is not None for worker in left)
    assert not list(tmp_path.glob("prune-eval-worker-gpu*"))
