"""Full-POPE throughput: prune_eval's fast path against the usual batch-1 loop, in the same run.

LLaVA-1.5-7B shapes with random fp16 weights (real FLOPs, no download), POPE's real question
structure (the pinned 8910 questions on 500 images, passed with --questions) and synthetic images
(content does not change the work). Every configuration generates exactly `--new-tokens` tokens
(no early stop), as the peer loop does, so the two are timed on the same work:
- peer: batch 1, HF `generate` on input embeddings with the method's visual tokens (vision tower
  and image-level pruning per question, as the official eval loops do); for SparseVLM and FastV,
  prune_eval's reference path at batch 1 (HF generate cannot prune inside the LLM). Timed on the first
  `--peer-questions` questions and extrapolated to the full set (said in the output).
- prune_eval: `eval.fast=true` over all questions, model loaded.
Reported: wall time for the full POPE, questions/s, speedup, prefill TFLOP/s of the packed path
against the matmul peak measured in the same run, where the time goes (vision / prefill / decode /
host), prefill token-layers (rows x row width summed over layers, padding included), the wall
time relative to VisionZip@64 when it is in the run, and peak GPU memory. `--check` also compares
first-token logits of the fast and reference paths on a few images. `--tiny` runs a small model on
the CPU to try the script (with `--limit-images` and a small `--peer-questions`).

    python benchmarks/pope_throughput.py --questions ../shared/data/pope/llava-1.5 --out bench.json
    python benchmarks/pope_throughput.py --questions ../shared/data/pope/llava-1.5 --tiny --limit-images 3 \
        --peer-questions 2 --configs visionzip-64,sparsevlm-v1.5-64,sparsevlm-v2-64,fastv-64
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune_eval.execution import fast  # noqa: E402
from prune_eval.data import images as image_ops  # noqa: E402
from prune_eval.data import pope, synthetic  # noqa: E402
from prune_eval.execution.engine import EvalSettings, evaluate_reference, tokenized_prompts, visual_tokens  # noqa: E402
from prune_eval.methods import get_method  # noqa: E402
from prune_eval.models import loading, tiny  # noqa: E402
from prune_eval.models.llm import attention_kernels, run_layers  # noqa: E402
from prune_eval.provenance import commit_label  # noqa: E402

CONFIGS = {
    "vanilla-576": ("vanilla", {}, 576),
    "visionzip-192": ("visionzip", {}, 192),
    "visionzip-128": ("visionzip", {}, 128),
    "visionzip-64": ("visionzip", {}, 64),
    "random-64": ("random", {}, 64),
    "sparsevlm-v1.5-192": ("sparsevlm", {"version": "v1.5"}, 192),
    "sparsevlm-v1.5-128": ("sparsevlm", {"version": "v1.5"}, 128),
    "sparsevlm-v1.5-64": ("sparsevlm", {"version": "v1.5"}, 64),
    "sparsevlm-v2-64": ("sparsevlm", {"version": "v2"}, 64),
    "fastv-64": ("fastv", {}, 64),
    "downsample-64": ("downsample", {}, 64),
}


@functools.lru_cache(maxsize=None)
def _picture(name: str):
    index = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 100_000
    return synthetic.render_image(7, index)


def synthetic_image_loader():
    """Any image name -> a deterministic synthetic picture (COCO content does not change the work).

    Pictures are drawn once and kept in memory, as a file-system cache would keep COCO's JPEGs:
    neither path is timed on drawing them (call `preload` first); both still decode nothing and
    pay for resizing and normalising."""
    return _picture


def preload(questions) -> None:
    for name in dict.fromkeys(q.image for q in questions):
        _picture(name)


def build_bundle(args) -> loading.ModelBundle:
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.float16
    config = tiny.build_config(text_layers=8) if args.tiny else tiny.llava15_shapes()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return loading.make_bundle(model, tiny.build_tokenizer(), tiny.build_image_processor(), dtype=dtype, device=device,
                               info={"checkpoint": "random weights, LLaVA-1.5-7B shapes" if not args.tiny else "tiny"})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device) -> float | None:
    """Median TFLOP/s of an 8192^3 fp16 matrix product on random data (the ceiling for prefill)."""
    if device.type != "cuda":
        return None
    a, b = torch.randn(8192, 8192, device=device, dtype=torch.float16), torch.randn(8192, 8192, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


class Timers:
    """Wall time (synchronized), matmul FLOPs and token-layers of the prefill and decode calls of the
    decoder loop (run_layers / forward_layers), as the fast path calls them."""

    def __init__(self, bundle) -> None:
        self.bundle = bundle
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.flops = 0.0
        self.token_layers = 0  # prefill: rows x row width (padding included), summed over layers
        self.unknown = False  # a hooked prefill whose per-layer shapes are not known
        cfg = bundle.model.config.text_config
        d, m = cfg.hidden_size, cfg.intermediate_size
        self.per_token = 2 * (4 * d * d + 3 * d * m)  # one layer: q, k, v, o and the gated MLP
        self.per_query_key = 4 * d  # one layer: q k^T and attention . v for one (query, key) pair

    def wrap(self, original):
        def timed(lm, hidden, positions, meta, cache, *, decoding, hook=None, **kwargs):
            layers = kwargs.get("layers") or range(lm.n_layers)
            cached = cache.get_seq_length(layers[0]) if len(layers) else 0
            sync(self.bundle.device)
            started = time.perf_counter()
            out = original(lm, hidden, positions, meta, cache, decoding=decoding, hook=hook, **kwargs)
            sync(self.bundle.device)
            self.seconds["decode" if decoding else "prefill"] += time.perf_counter() - started
            if not decoding:
                # (rows, row width, keys per row) per layer: the question-blocks hook records them
                shapes = getattr(hook, "processed", None) if hook is not None else [(hidden.shape[0], hidden.shape[1], cached + hidden.shape[1])] * len(layers)
                if shapes is None:
                    self.unknown = True
                for rows, width, keys in shapes or []:
                    self.flops += rows * width * (self.per_token + keys * self.per_query_key)
                    self.token_layers += rows * width
            return out

        return timed


def run_fast(bundle, name: str, questions, settings: EvalSettings) -> dict:
    method_name, options, budget = CONFIGS[name]
    method = get_method(method_name)
    params = method.resolve(options, budget, bundle.geometry)
    timers = Timers(bundle)
    original, original_forward = fast.run_layers, fast.forward_layers
    fast.run_layers, fast.forward_layers = timers.wrap(original), timers.wrap(original_forward)
    import prune_eval.execution.engine as engine

    engine_original = engine.run_layers
    engine.run_layers = timers.wrap(engine_original)
    answers: list = []
    if bundle.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(bundle.device)
    started = time.perf_counter()
    try:
        fast.evaluate_fast(bundle, method, params, questions, synthetic_image_loader(), preprocess="pad", settings=settings,
                           seed=0, on_answers=answers.extend)
        sync(bundle.device)
    finally:
        fast.run_layers, fast.forward_layers, engine.run_layers = original, original_forward, engine_original
    wall = time.perf_counter() - started
    assert len(answers) == len(questions)
    return {
        "wall_s": wall,
        "questions_per_s": len(questions) / wall,
        "prefill_s": timers.seconds["prefill"],
        "decode_s": timers.seconds["decode"],
        "prefill_tflops": timers.flops / timers.seconds["prefill"] / 1e12 if timers.flops and not timers.unknown else None,
        "prefill_token_layers": timers.token_layers if not timers.unknown else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if bundle.device.type == "cuda" else None,
        "new_tokens": statistics.mean(len(a.generation.token_ids) for a in answers),
    }


@torch.no_grad()
def run_peer(bundle, name: str, questions, settings: EvalSettings) -> dict:
    """Batch 1: per question vision + pruning + HF generate (image-level methods), or prune_eval's
    reference path at batch 1 (SparseVLM)."""
    method_name, options, budget = CONFIGS[name]
    method = get_method(method_name)
    params = method.resolve(options, budget, bundle.geometry)
    load_image = synthetic_image_loader()
    one = EvalSettings(batch_size=1, max_new_tokens=settings.max_new_tokens, stop_when_decided=False, fast=False)
    sync(bundle.device)
    started = time.perf_counter()
    if method.text_dependent:
        evaluate_reference(bundle, method, params, questions, load_image, preprocess="pad", settings=one, seed=0, on_answers=lambda a: None)
    else:
        # the official loops preprocess in DataLoader workers, in parallel: not timed here either
        pixel_values = [image_ops.preprocess([load_image(q.image)], "pad", bundle.image_processor) for q in questions]
        tokenized = tokenized_prompts(bundle, questions)
        embed = bundle.lm.embed_tokens
        sync(bundle.device)
        started = time.perf_counter()
        generate_s = 0.0
        for pixels, suffix in zip(pixel_values, tokenized.suffixes):
            visual = visual_tokens(bundle, method, params, pixels, [0])
            ids = torch.tensor(list(tokenized.prefix) + list(suffix), device=bundle.device)
            prefix_len = len(tokenized.prefix)
            embeds = torch.cat([embed(ids[:prefix_len]), visual[0], embed(ids[prefix_len:])])[None]
            sync(bundle.device)
            generate_started = time.perf_counter()
            bundle.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=bundle.device),
                                  max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.max_new_tokens, do_sample=False,
                                  pad_token_id=bundle.tokenizer.pad_token_id)
            sync(bundle.device)
            generate_s += time.perf_counter() - generate_started
    sync(bundle.device)
    per_question = (time.perf_counter() - started) / len(questions)
    llm = generate_s / len(questions) if not method.text_dependent else None
    return {"per_question_s": per_question, "timed_questions": len(questions), "llm_per_question_s": llm}


@torch.no_grad()
def check_logits(bundle, questions, n_images: int) -> dict:
    """First-token logits, fast vs reference path, on the questions of the first images."""
    images = list(dict.fromkeys(q.image for q in questions))[:n_images]
    subset = [q for q in questions if q.image in images]
    out = {}
    for name in ("vanilla-576", "visionzip-64", "sparsevlm-v1.5-64", "fastv-64", "downsample-64"):
        method_name, options, budget = CONFIGS[name]
        method = get_method(method_name)
        params = method.resolve(options, budget, bundle.geometry)
        results = {}
        for path in (fast.evaluate_fast, evaluate_reference):
            answers: list = []
            settings = EvalSettings(batch_size=8, max_new_tokens=1, stop_when_decided=False, fast=path is fast.evaluate_fast, batch_images=4)
            path(bundle, method, params, subset, synthetic_image_loader(), preprocess="pad", settings=settings, seed=0, on_answers=answers.extend)
            results[path.__name__] = {a.question.key: a.generation for a in answers}
        errors, agree = [], 0
        for key, reference in results["evaluate_reference"].items():
            got = results["evaluate_fast"][key]
            errors.append(float((got.first_logits - reference.first_logits).norm() / reference.first_logits.norm()))
            agree += got.token_ids == reference.token_ids
        out[name] = {"questions": len(errors), "max_relative_logit_error": max(errors), "same_first_token": agree}
    return out


def environment(device: torch.device) -> dict:
    commit = commit_label()
    import transformers

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit or None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=Path, required=True, help="folder with POPE's coco_pope_<split>.json (llava-1.5 version)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--images-per-batch", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--peer-questions", type=int, default=100)
    parser.add_argument("--limit-images", type=int, default=None, help="use only the questions of the first N images")
    parser.add_argument("--check", type=int, default=0, help="compare fast vs reference first-token logits on N images")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, to try the script")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder layers (eval.compile=true); compile time is reported apart")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choices: {', '.join(CONFIGS)}")

    questions, provenance = pope.load_pope(args.questions, version="llava-1.5")
    if args.limit_images:
        keep = set(list(dict.fromkeys(q.image for q in questions))[: args.limit_images])
        questions = [q for q in questions if q.image in keep]
    preload(questions)
    bundle = build_bundle(args)
    result = {"environment": environment(bundle.device), "questions": len(questions), "images": len({q.image for q in questions}),
              "new_tokens": args.new_tokens, "images_per_batch": args.images_per_batch, "batch_tokens": args.batch_tokens, "matmul_peak_tflops": matmul_peak(bundle.device),
              "configs": {}}
    print(json.dumps({k: v for k, v in result.items() if k != "configs"}), flush=True)
    if args.check:
        result["check"] = check_logits(bundle, questions, args.check)
        print("check", json.dumps(result["check"]), flush=True)
    settings = EvalSettings(batch_size=8, max_new_tokens=args.new_tokens, stop_when_decided=False, fast=True,
                            batch_images=args.images_per_batch, batch_tokens=args.batch_tokens)
    peer_lm = bundle.lm
    if args.compile:
        bundle.lm = bundle.lm.compiled()
    started = time.perf_counter()
    # warm-up: kernels, allocator, compilation of the shapes each timed configuration meets (masks, pruned widths)
    for warm in dict.fromkeys(["visionzip-64", "vanilla-576", *configs]):
        run_fast(bundle, warm, questions[:36], settings)
    result["warmup_s"] = time.perf_counter() - started
    result["compiled"] = args.compile
    for name in configs:
        ours = run_fast(bundle, name, questions, settings)
        compiled_lm, bundle.lm = bundle.lm, peer_lm  # the peer loop runs eager, as everyone's does
        peer = run_peer(bundle, name, questions[: args.peer_questions], settings)
        bundle.lm = compiled_lm
        peer_full = peer["per_question_s"] * len(questions)
        entry = {**ours, "peer_per_question_s": peer["per_question_s"], "peer_timed_questions": peer["timed_questions"],
                 "peer_llm_per_question_s": peer["llm_per_question_s"],
                 "peer_full_s_extrapolated": peer_full, "speedup": peer_full / ours["wall_s"]}
        result["configs"][name] = entry
        if "visionzip-64" in result["configs"]:  # the SparseVLM issue's target: at most 2x VisionZip@64, same run
            for e in result["configs"].values():
                e["vs_visionzip_64"] = e["wall_s"] / result["configs"]["visionzip-64"]["wall_s"]
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{'config':20} {'ours s':>8} {'q/s':>7} {'peer s*':>8} {'speedup':>8} {'/VZ@64':>7} {'prefill TF/s':>12} {'prefill s':>9} {'decode s':>8} {'M tok-layers':>12} {'peak GiB':>8}")
    for name, e in result["configs"].items():
        tf = f"{e['prefill_tflops']:.0f}" if e["prefill_tflops"] else "-"
        mem = f"{e['peak_memory_gib']:.1f}" if e["peak_memory_gib"] else "-"
        ratio = f"{e['vs_visionzip_64']:.2f}" if "vs_visionzip_64" in e else "-"
        tokens = f"{e['prefill_token_layers'] / 1e6:.2f}" if e["prefill_token_layers"] is not None else "-"
        print(f"{name:20} {e['wall_s']:8.1f} {e['questions_per_s']:7.0f} {e['peer_full_s_extrapolated']:8.0f} {e['speedup']:7.1f}x {ratio:>7} "
              f"{tf:>12} {e['prefill_s']:9.1f} {e['decode_s']:8.1f} {tokens:>12} {mem:>8}")
    print(f"* peer extrapolated from {args.peer_questions} questions; matmul peak {result['matmul_peak_tflops']}")


if __name__ == "__main__":
    with attention_kernels():  # the same SDPA backends for prune_eval and the peer loop
        main()
