"""Where the fast path's time goes: torch.profiler over a few image batches (7B shapes, GPU).

    python benchmarks/profile_fast.py --questions ../shared/data/pope/llava-1.5 --config vanilla-576
Prints the top CUDA kernels and CPU operators, and GPU-busy vs wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pope_throughput import CONFIGS, build_bundle, synthetic_image_loader  # noqa: E402
from prune_eval.data import pope  # noqa: E402
from prune_eval.models.llm import attention_kernels  # noqa: E402
from prune_eval.execution.engine import EvalSettings  # noqa: E402
from prune_eval.execution.fast import evaluate_fast  # noqa: E402
from prune_eval.methods import get_method  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--config", default="vanilla-576")
    parser.add_argument("--images-per-batch", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--trace", type=Path, default=None, help="write a Chrome trace here")
    args = parser.parse_args()
    bundle = build_bundle(args)
    questions, _ = pope.load_pope(args.questions, version="llava-1.5")
    images = list(dict.fromkeys(q.image for q in questions))
    method_name, options, budget = CONFIGS[args.config]
    method = get_method(method_name)
    params = method.resolve(options, budget, bundle.geometry)
    settings = EvalSettings(batch_size=8, max_new_tokens=args.new_tokens, stop_when_decided=False, fast=True,
                            batch_images=args.images_per_batch, batch_tokens=args.batch_tokens)
    loader = synthetic_image_loader()

    def run(first: int) -> None:
        keep = set(images[first : first + args.images_per_batch * args.batches])
        evaluate_fast(bundle, method, params, [q for q in questions if q.image in keep], loader, preprocess="pad",
                      settings=settings, seed=0, on_answers=lambda answers: None)

    run(0)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bundle.device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        run(args.images_per_batch * args.batches)
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    sort = "self_cuda_time_total" if bundle.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if bundle.device.type == "cuda":
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
        print(f"wall {wall:.2f} s under the profiler; GPU busy {busy:.2f} s ({100 * busy / wall:.0f}%)")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    with attention_kernels():  # the same SDPA backends for prune_eval and the peer loop
        main()
