"""The design card's sweep through the real CLI on one and on two GPUs: wall time against unique work.

    python benchmarks/resident_sweep.py --questions ../shared/data/pope/llava-1.5 --out /tmp/bench-resident

runs `python -m prune_eval -m method=visionzip,sparsevlm budget=64 seed=0,1,2,3,4` (ten jobs, six
computations: VisionZip draws no random numbers, SparseVLM v1.5 does) on the full POPE (8910
questions) with LLaVA-1.5-7B shapes and random fp16 weights (saved once with
benchmarks/quant_load.py, loaded through model.path), stand-in COCO images (benchmarks/fake_coco.py),
`eval.max_new_tokens=3`, the fast path (eval.fast=auto on CUDA) and otherwise the CLI's defaults
(eager: `eval.compile=false`; `--compile` sets it), with `launch=local-gpus launch.gpus=[0]` and then
`[0,1]`. Each run gets a fresh sweep directory and, unless --warm-compile-cache, a fresh TorchInductor
cache (a cold compile, as on a new machine).

From the cells' summaries (`timing`, summed over the `computed` events of launches.jsonl):
- unique compute: the cells' compute seconds, compile time excluded, summed;
- loads: how many model loads the workers did, and their seconds;
- compile: seconds torch.compile spent, summed over the workers.
Targets (issue 20): one-GPU wall <= 1.2 x (unique compute + one load + one compile, from the
one-GPU run); two-GPU wall <= 0.55 x one-GPU wall. The script prints one JSON object (also
written to OUT/resident_sweep.json) with every run's figures and whether each target is met.

`--tiny` does the same on the CPU in a minute: the tiny random LLaVA, synthetic POPE, two fake GPU
ids (CUDA_VISIBLE_DEVICES=0,1 with device=cpu), no compile. It exercises the script, not the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prune_eval.execution.worker import log_time  # noqa: E402  (torch-free)
SWEEP = ["method=visionzip,sparsevlm", "budget=64", "seed=0,1,2,3,4"]
ONE_GPU_FACTOR, TWO_GPU_FACTOR = 1.2, 0.55


def run(command: list[str], **kwargs) -> None:
    subprocess.run(command, check=True, cwd=REPO, **kwargs)


def prepare(args) -> list[str]:
    """The checkpoint, images and overrides for the model and data (created when missing)."""
    if args.tiny:
        return ["model=tiny", "quant=fp32", "data=pope-synthetic", f"data.n_images={args.tiny_images}", "device=cpu",
                "eval.fast=true", "eval.shard_images=1"]
    if not (args.checkpoint / "config.json").is_file():
        run([sys.executable, "benchmarks/quant_load.py", "save", "--out", str(args.checkpoint)])
    if not args.images.is_dir():
        run([sys.executable, "benchmarks/fake_coco.py", "--questions", str(args.questions), "--out", str(args.images)])
    return ["model=llava-1.5-7b", f"model.path={args.checkpoint}", "quant=fp16", "data=pope", f"data.question_dir={args.questions}",
            f"data.image_dir={args.images}", "device=cuda"]


def summaries(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]


def measure(args, base: list[str], gpus: int) -> dict:
    """One sweep on `gpus` GPUs in a fresh directory; its wall time and what its cells report."""
    name = f"resident-{gpus}gpu"
    sweep_dir = args.out / name
    if sweep_dir.exists():
        raise SystemExit(f"{sweep_dir} exists; remove it or use another --out (a rerun would skip the complete cells)")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if not args.warm_compile_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{name}-")
    if args.tiny:
        env.update(CUDA_VISIBLE_DEVICES=",".join(map(str, range(max(args.gpus)))), OMP_NUM_THREADS="1")
    ids = ",".join(map(str, range(gpus)))
    profile = ["-m", "cProfile", "-o", str(args.out / f"{name}.prof")] if args.profile else []
    command = [sys.executable, *profile, "-m", "prune_eval", "-m", *base, *args.sweep, f"eval.max_new_tokens={args.new_tokens}",
               f"eval.compile={'true' if args.compile else 'false'}", "launch=local-gpus", f"launch.gpus=[{ids}]",
               *(["launch.skip_busy=false"] if args.tiny else []), "launch.progress_s=30", f"name={name}",
               f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.report=false"]  # the report is not part of the sweep's work
    log = args.out / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write(f"[{log_time()}] benchmark: sweep process started\n")
        out.flush()
        code = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        out.write(f"[{log_time()}] benchmark: sweep process ended (exit {code})\n")
    wall = time.perf_counter() - started
    for worker_log in sweep_dir.glob(".submitit/*/*_log.out"):  # the workers' timestamped logs, next to the sweep's
        shutil.copy(worker_log, args.out / f"{name}-{worker_log.name}")
    cells = summaries(sweep_dir)
    if code != 0 or not cells:
        raise SystemExit(f"the {gpus}-GPU sweep failed (exit {code}); see {log}")
    plan = json.loads((sweep_dir / "plan.json").read_text())["cells"]
    timing = [c["timing"] for c in cells]
    return {
        "gpus": gpus,
        "wall_s": round(wall, 2),
        "jobs": sum(1 + len(c["aliases"]) for c in plan.values()),
        "cells": len(cells),
        "unique_compute_s": round(sum(t["compute_s"] for t in timing), 2),
        "loads": sum(t["loads"] for t in timing),
        "load_s": round(sum(t["load_s"] for t in timing), 2),
        "compile_s": round(sum(t["compile_s"] for t in timing), 2),
        "workers": sorted({w for t in timing for w in t["workers"]}),
        "shared_cells": sum(len(t["workers"]) > 1 for t in timing),
        "per_cell": {c["cell"]: {"compute_s": c["timing"]["compute_s"], "workers": c["timing"]["workers"], "questions": c["n_questions"]}
                     for c in cells},
        "log": str(log),
    }


def targets(runs: dict[int, dict]) -> dict:
    result: dict = {}
    one = runs.get(1)
    if one:
        budget = one["unique_compute_s"] + one["load_s"] / max(1, one["loads"]) + one["compile_s"] / max(1, len(one["workers"]))
        result["one_gpu"] = {"wall_s": one["wall_s"], "limit_s": round(ONE_GPU_FACTOR * budget, 2),
                             "ratio_to_work": round(one["wall_s"] / budget, 3) if budget else None, "met": one["wall_s"] <= ONE_GPU_FACTOR * budget}
    if one and runs.get(2):
        ratio = runs[2]["wall_s"] / one["wall_s"]
        result["two_gpus"] = {"wall_s": runs[2]["wall_s"], "ratio_to_one_gpu": round(ratio, 3), "limit": TWO_GPU_FACTOR, "met": ratio <= TWO_GPU_FACTOR}
    return result


def environment(tiny: bool) -> dict:
    from prune_eval.provenance import commit_label

    info = {"date": time.strftime("%Y-%m-%d"), "commit": commit_label()}
    if not tiny:
        import torch

        info.update(device=torch.cuda.get_device_name(0), gpus_visible=torch.cuda.device_count(), torch=torch.__version__)
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=Path, help="folder with POPE's coco_pope_<split>.json (llava-1.5 version)")
    parser.add_argument("--out", type=Path, required=True, help="where the sweeps, their logs and resident_sweep.json go")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, e.g. 1,2")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/llava7b-random"), help="random 7B-shape checkpoint (saved if missing)")
    parser.add_argument("--images", type=Path, default=Path("/tmp/coco"), help="stand-in COCO images (drawn if missing)")
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="eval.compile=true (the decoder layers under torch.compile)")
    parser.add_argument("--warm-compile-cache", action="store_true", help="share TorchInductor's cache between runs")
    parser.add_argument("--profile", action="store_true", help="run the sweep process under cProfile (OUT/resident-<n>gpu.prof)")
    parser.add_argument("--sweep", nargs="*", default=SWEEP, help="the swept overrides (default: the design card's)")
    parser.add_argument("--tiny", action="store_true", help="CPU check of the script: tiny model, synthetic POPE, fake GPU ids")
    parser.add_argument("--tiny-images", type=int, default=4)
    args = parser.parse_args(argv)
    args.gpus = [int(g) for g in str(args.gpus).split(",")]
    if args.tiny:
        args.compile = False  # inductor on a shared CPU would time the C++ compiler, not the sweep
    elif args.questions is None:
        parser.error("--questions is required (POPE's coco_pope_<split>.json files), except with --tiny")
    args.out.mkdir(parents=True, exist_ok=True)
    base = prepare(args)
    runs = {g: measure(args, base, g) for g in args.gpus}
    result = {"environment": environment(args.tiny), "sweep": args.sweep, "tiny": args.tiny, "compile": args.compile,
              "new_tokens": args.new_tokens, "runs": {str(g): r for g, r in runs.items()}, "targets": targets(runs)}
    (args.out / "resident_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
