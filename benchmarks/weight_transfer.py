"""Moving a checkpoint's weights to the GPU: `model.to("cuda")` against prune_eval.models.transfer.

    python benchmarks/weight_transfer.py --checkpoint /tmp/llava7b-random --repeats 3 --out weight_transfer.json

After one load to warm the page cache, each repeat loads the checkpoint with `from_pretrained`
(weights left in its memory map, as prune_eval's loading does) and moves it with `model.to("cuda")`,
loads it again and moves it with `move_to_device` (the other order in odd repeats), then compares
every parameter and buffer of the two, byte for byte. The
checkpoint is LLaVA-1.5-7B's shapes with random fp16 weights (`benchmarks/quant_load.py save`);
its files are then in the page cache, as for a worker's second model or a warm node. Prints one JSON object (also written to --out): seconds per repeat and method, GB/s, equal.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pope_throughput import environment  # noqa: E402
from prune_eval.models.transfer import CHUNK_BYTES, COPY_THREADS, move_to_device  # noqa: E402


def load(checkpoint: Path) -> torch.nn.Module:
    return LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float16, attn_implementation="sdpa", local_files_only=True)


def timed(move, model: torch.nn.Module) -> tuple[torch.nn.Module, float]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    model = move(model)
    torch.cuda.synchronize()
    return model, time.perf_counter() - started


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("weight_transfer.py measures copies to a CUDA GPU; none is visible here")
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {args.checkpoint}; save one with: python benchmarks/quant_load.py save --out {args.checkpoint}")
    device = torch.device("cuda")
    torch.empty(1, device=device)  # CUDA's start-up is not the copy's
    rows = []
    load(args.checkpoint)  # the files into the page cache, so that neither method pays the disk
    for repeat in range(args.repeats):
        staged_first = repeat % 2 == 1  # alternate which one goes first
        if staged_first:
            staged, staged_s = timed(lambda m: move_to_device(m, device), load(args.checkpoint))
        plain, plain_s = timed(lambda m: m.to(device), load(args.checkpoint))
        if not staged_first:
            staged, staged_s = timed(lambda m: move_to_device(m, device), load(args.checkpoint))
        a, b = tensors(plain), tensors(staged)
        equal = a.keys() == b.keys() and all(b[name].device.type == "cuda" and torch.equal(a[name], b[name]) for name in a)
        gib = sum(t.numel() * t.element_size() for t in a.values()) / 2**30
        rows.append({"repeat": repeat, "gib": round(gib, 2), "to_s": round(plain_s, 3), "staged_s": round(staged_s, 3),
                     "to_gb_s": round(gib * 2**30 / plain_s / 1e9, 1), "staged_gb_s": round(gib * 2**30 / staged_s / 1e9, 1), "equal": equal})
        del plain, staged, a, b
        torch.cuda.empty_cache()
    report = {"environment": environment(device), "checkpoint": str(args.checkpoint), "threads": COPY_THREADS, "chunk_mib": CHUNK_BYTES >> 20, "runs": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not all(row["equal"] for row in rows):
        raise SystemExit("the staged copy differs from model.to(cuda)")
    return report


if __name__ == "__main__":
    main()
