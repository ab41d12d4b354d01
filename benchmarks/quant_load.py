"""Precision/quantization on LLaVA-1.5-7B shapes: load time, memory and per-question latency.

Two steps, each a fresh process so load times and memory are not shared:
    python benchmarks/quant_load.py save --out /tmp/llava7b-random          # random 7B-shape checkpoint
    python benchmarks/quant_load.py measure --checkpoint /tmp/llava7b-random --quant int8 \\
        --questions ../shared/data/pope/llava-1.5 --out quant-int8.json
`measure` loads the checkpoint through prune_eval's real loading path (model.path, the quant
group's bitsandbytes config, LLM-only by default), then reports load time, the model's memory
footprint and peak GPU memory, batch-1 latency per question on the reference path, throughput
on the fast path, and the first-token logits' relative error against fp16 on the same questions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pope_throughput import environment, synthetic_image_loader  # noqa: E402
from prune_eval.config import CONF_DIR  # noqa: E402
from prune_eval.data import pope  # noqa: E402
from prune_eval.models.llm import attention_kernels  # noqa: E402
from prune_eval.execution.engine import EvalSettings, evaluate_reference  # noqa: E402
from prune_eval.execution.fast import evaluate_fast  # noqa: E402
from prune_eval.methods import get_method  # noqa: E402
from prune_eval.models import loading, tiny  # noqa: E402
from prune_eval.models.quant import check_backend, precision_of  # noqa: E402


def save(out: Path) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(tiny.llava15_shapes(), dtype=torch.float16)
    started = time.perf_counter()
    model.save_pretrained(out)
    tiny.build_tokenizer().save_pretrained(out)
    tiny.build_image_processor().save_pretrained(out)
    print(json.dumps({"saved": str(out), "seconds": round(time.perf_counter() - started, 1),
                      "gib": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**30, 2)}))


def logits_of(bundle, questions, fast: bool) -> dict:
    method = get_method("vanilla")
    answers: list = []
    settings = EvalSettings(batch_size=1, max_new_tokens=3, stop_when_decided=False, fast=fast)
    torch.cuda.synchronize()
    started = time.perf_counter()
    (evaluate_fast if fast else evaluate_reference)(bundle, method, {}, questions, synthetic_image_loader(), preprocess="pad",
                                                     settings=settings, seed=0, on_answers=answers.extend)
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "logits": {a.question.key: a.generation.first_logits for a in answers}}


def measure(args) -> None:
    quant_cfg = OmegaConf.load(CONF_DIR / "quant" / f"{args.quant}.yaml")
    precision = precision_of(quant_cfg)
    device = torch.device("cuda")
    model_cfg = OmegaConf.create({"name": "llava-1.5-7b-random", "source": "hub", "id": "unused", "path": str(args.checkpoint), "revision": None, "tokenization": "hf"})
    loading.check_available(model_cfg)
    check_backend(precision, device, (4096, 11008))
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    bundle = loading.load(model_cfg, dtype=precision.dtype, device=device, quantization_config=precision.quantization_config)
    torch.cuda.synchronize()
    load_seconds = time.perf_counter() - started
    after_load = torch.cuda.memory_allocated() / 2**30
    questions, _ = pope.load_pope(args.questions, version="llava-1.5")
    images = list(dict.fromkeys(q.image for q in questions))[: args.images]
    subset = [q for q in questions if q.image in images]
    logits_of(bundle, subset[:4], fast=False)  # warm-up
    reference = logits_of(bundle, subset[: args.latency_questions], fast=False)
    fast = logits_of(bundle, subset, fast=True)
    result = {
        "environment": environment(device),
        "quant": args.quant,
        "quantized_modules": len(bundle.info["quantized_modules"]),
        "load_s": round(load_seconds, 2),
        "model_footprint_gib": round(bundle.info["memory_footprint_bytes"] / 2**30, 2),
        "allocated_after_load_gib": round(after_load, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "batch1_latency_ms_per_question": round(1e3 * reference["seconds"] / len(reference["logits"]), 1),
        "fast_ms_per_question": round(1e3 * fast["seconds"] / len(fast["logits"]), 2),
        "questions": len(subset),
    }
    path = Path(f"/tmp/first-logits-{args.quant}.pt")
    torch.save({k: v.cpu() for k, v in fast["logits"].items()}, path)
    baseline = Path("/tmp/first-logits-fp16.pt")
    if args.quant != "fp16" and baseline.exists():
        ref = torch.load(baseline)
        errors = [float((fast["logits"][k].cpu() - ref[k]).norm() / ref[k].norm()) for k in ref if k in fast["logits"]]
        result["first_logits_rel_error_vs_fp16"] = {"median": round(statistics.median(errors), 4), "max": round(max(errors), 4)}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save")
    s.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--checkpoint", type=Path, required=True)
    m.add_argument("--quant", required=True, choices=["fp16", "bf16", "int8", "nf4"])
    m.add_argument("--questions", type=Path, required=True)
    m.add_argument("--images", type=int, default=16)
    m.add_argument("--latency-questions", type=int, default=24)
    m.add_argument("--out", type=Path)
    args = parser.parse_args()
    save(args.out) if args.command == "save" else measure(args)


if __name__ == "__main__":
    with attention_kernels():  # the same SDPA backends for prune_eval and the peer loop
        main()
