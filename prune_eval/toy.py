"""A toy LLaVA trained on synthetic POPE, so that the demo and the end-to-end tests show real effects.

With random weights every method answers at chance and no test can tell a working pipeline from a
broken one. This trains the real architecture (CLIP-style vision tower at 336 px / 14 px patches ->
576 visual tokens, 2-layer projector, Llama LLM, the tiny word-level tokenizer) on coloured-shape
images with POPE-style questions, LLaVA's prompt template and `pad` preprocessing, until it answers
"Yes"/"No" well with all 576 tokens. Pruning then costs accuracy in the ways one expects.

    python -m prune_eval.toy train --out prune_eval/assets/toy --device cuda --workers 4   # ~8 min on an H100
    python -m prune_eval.toy evaluate --checkpoint prune_eval/assets/toy

Three stages, as LLaVA's own recipe (a pre-trained CLIP, projector alignment, instruction tuning):
1. the vision tower learns dense patch labels (colour and shape of every patch), standing in for
   CLIP's pre-training; `vision_probe` measures it on unseen images;
2. the projector maps patch features onto the LLM's word embeddings of their colour and shape;
3. projector and LLM learn the questions (the tower frozen). A curriculum shows the LLM every object
   patch but only a growing share of background patches, from none to all 576 over the first 40% of
   the steps: without it the answer patch is a needle among 576 and training stalls at chance.

Training images are synthetic POPE with generator seed `TRAIN_DATA_SEED`; the test split
(`data=pope-synthetic`, seed 0) uses seed 0, so train and test images are disjoint by construction.
Each training step packs all of an image's distinct questions into one row after its image (the fast
path's layout), with the answer token and EOS as targets. Deterministic kernels are required
(`torch.use_deterministic_algorithms`): the same seed gives bit-identical weights on the same
hardware and software (without them memory-efficient attention's backward is not, and two runs of
one seed ended 2 to 12 points apart).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from prune_eval.data import images as image_ops
from prune_eval.data import synthetic
from prune_eval.execution.fast import group_by_image, pack_rows
from prune_eval.models import tiny
from prune_eval.models.llm import KVCache, LanguageModel, TokenMeta, run_layers
from prune_eval.models.prompt import tokenize_prompts
from prune_eval.provenance import git_state

TRAIN_DATA_SEED = 1000
DIMS = {"vision_hidden": 128, "vision_layers": 4, "vision_heads": 4, "text_hidden": 128, "text_layers": 6, "text_heads": 2}


def toy_config(dims: dict | None = None):
    """The toy's shapes: 6 LLM layers (SparseVLM's layers map by the scaled rule to 0/1/2[/3]),
    64-wide attention heads (v2's gravity divisor stays positive over the prompt length), widths
    that are multiples of 64 (bitsandbytes' CPU 4-bit kernels)."""
    return tiny.build_config(**{**DIMS, **(dims or {})})


def training_rows(tokenizer, questions, image_token_id: int):
    """Per image: its distinct prompts, each followed by its answer word; and the answer ids."""
    tokenized = tokenize_prompts([q.prompt for q in questions], tokenizer, mode="hf", image_token_id=image_token_id)
    suffix_of = dict(zip((q.key for q in questions), tokenized.suffixes))
    answer_ids = {"yes": tokenizer.convert_tokens_to_ids("Yes"), "no": tokenizer.convert_tokens_to_ids("No")}
    work = group_by_image(questions, suffix_of)
    rows = [[list(p) + [answer_ids[group[0].label]] for p, group in zip(w.prompts, w.questions)] for w in work]
    return tokenized.prefix, work, rows


COLOR_NAMES = ("none", *synthetic.COLORS)
SHAPE_NAMES = ("none", *synthetic.SHAPES)


def _inside(obj: synthetic.SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points (x, y) lie on the drawn shape (as render_scene draws it)."""
    x0, y0, x1, y1 = obj.box
    shape = obj.name.split(" ")[1]
    if shape == "circle":
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    if shape == "square":
        inset = (x1 - x0) // 8
        return (x0 + inset <= x) & (x <= x1 - inset) & (y0 + inset <= y) & (y <= y1 - inset)
    half = (x1 - x0) / 2 * (y - y0) / max(1, y1 - y0)  # triangle: apex at the top centre, base at the bottom
    return (y0 <= y) & (y <= y1) & (np.abs(x - (x0 + x1) / 2) <= half)


def patch_targets(scene: synthetic.Scene, grid: int = 24, size: int = 336) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour and shape class of each patch centre of the `pad`-preprocessed image (0 = background).

    The dense labels of the vision tower's pre-training stage: they stand in for CLIP's pre-training,
    which gives LLaVA a vision tower whose patch features already describe what is where."""
    width, height = scene.size
    side = max(width, height)
    centres = (np.arange(grid) + 0.5) * (size / grid) * side / size
    x, y = np.meshgrid(centres - (side - width) // 2, centres - (side - height) // 2)  # (grid, grid), row-major like the patches
    colors, shapes = np.zeros(grid * grid, dtype=np.int64), np.zeros(grid * grid, dtype=np.int64)
    for obj in scene.objects:
        color, shape = obj.name.split(" ")
        inside = _inside(obj, x, y).reshape(-1)
        colors[inside], shapes[inside] = COLOR_NAMES.index(color), SHAPE_NAMES.index(shape)
    return torch.from_numpy(colors), torch.from_numpy(shapes)


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Layer -2 patch features, CLS dropped: what LLaVA feeds the projector. (B, 576, Dv)"""
    return model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]


def dense_loss(heads: torch.nn.ModuleDict, features: torch.Tensor, colors: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(heads["color"](features).flatten(0, 1), colors.flatten()) + F.cross_entropy(heads["shape"](features).flatten(0, 1), shapes.flatten())


@torch.no_grad()
def vision_probe(model, heads: torch.nn.ModuleDict, target: torch.device, seed: int, images: int = 32) -> dict:
    """How well the pre-trained tower's patch features name colour and shape, on images no training
    step uses: the ceiling of what the LLM can read from them."""
    pixel_values, colors, shapes, _ = batch_of(seed, 0, "probe", images, tiny.build_image_processor())
    features = vision_features(model, pixel_values.to(target))
    colors, shapes = colors.to(target), shapes.to(target)
    on_object = colors > 0
    color_ok, shape_ok = heads["color"](features).argmax(-1) == colors, heads["shape"](features).argmax(-1) == shapes
    return {"object_patch_colour_accuracy": round(float(color_ok[on_object].float().mean()), 4),
            "object_patch_shape_accuracy": round(float(shape_ok[on_object].float().mean()), 4),
            "background_patch_accuracy": round(float(color_ok[~on_object].float().mean()), 4)}


def word_targets(lm: LanguageModel, tokenizer, colors: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """What the projector should output for each patch: the sum of the input embeddings of its
    colour and shape words; for background the embedding of "image" (not zero: the LLM's RMSNorm
    would blow a near-zero vector up to noise). Detached. (B, 576, D)"""
    background = tokenizer.convert_tokens_to_ids("image")
    color_ids = torch.tensor([tokenizer.convert_tokens_to_ids(n) if n != "none" else background for n in COLOR_NAMES], device=colors.device)
    shape_ids = torch.tensor([tokenizer.convert_tokens_to_ids(n) if n != "none" else background for n in SHAPE_NAMES], device=colors.device)
    table = lm.embed_tokens.weight.detach()
    return table[color_ids[colors]] + table[shape_ids[shapes]]


def alignment_loss(model, lm: LanguageModel, tokenizer, vision: torch.Tensor, colors: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """LLaVA's stage-1 idea (align visual tokens with the LLM's word space) as a dense regression:
    object patches towards their words' embeddings, background towards "image", each half weighted alike."""
    error = (model.model.multi_modal_projector(vision) - word_targets(lm, tokenizer, colors, shapes)).pow(2).mean(-1)
    objects = colors > 0
    return error[objects].mean() + error[~objects].mean()


def curriculum_tokens(colors: torch.Tensor, background_share: float, generator: torch.Generator) -> torch.Tensor:
    """Which visual tokens the LLM sees at one training step: every object patch and a random
    `background_share` of the background patches, in raster order (B, K).

    Finding the one patch that answers a question among 576 is a needle search whose gradient is
    diluted 576-fold at the start; with few background tokens the LLM learns the search in a few
    hundred steps, and the share then grows to 1 (all 576 tokens, as at test time)."""
    n_patches = colors.shape[1]
    if background_share >= 1:
        return torch.arange(n_patches, device=colors.device).expand(colors.shape[0], -1)
    objects = colors > 0
    n_keep = int((objects.sum(1) + (background_share * (~objects).sum(1)).round().long()).max())
    priority = torch.rand(colors.shape, generator=generator).to(colors.device) + 2 * objects  # objects first
    return priority.topk(max(1, n_keep), dim=1).indices.sort(dim=1).values


def loss_of(model, lm: LanguageModel, vision: torch.Tensor, prefix, rows, eos: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each question's answer word and of EOS after it, all questions packed;
    `keep` (B, K) selects the visual tokens the LLM sees (curriculum_tokens), None = all."""
    visual = model.model.multi_modal_projector(vision)  # (B, 576, D)
    if keep is not None:
        visual = visual.gather(1, keep[..., None].expand(-1, -1, visual.shape[-1]))
    packed = pack_rows(prefix, visual.shape[1], rows)
    packed = type(packed)(*(t.to(visual.device) for t in (packed.ids, packed.is_visual, packed.segment, packed.positions, packed.last, packed.lengths)))
    hidden = lm.embed_tokens(packed.ids).masked_scatter(packed.is_visual[..., None], visual)
    width = packed.ids.shape[1]
    meta = TokenMeta(torch.arange(width, device=visual.device).expand(len(rows), width), packed.segment)
    out, _ = run_layers(lm, hidden, packed.positions, meta, KVCache(lm.n_layers), decoding=False)
    present = packed.lengths > 0
    answer_at = (packed.last - 1).clamp(min=0)  # the token before the answer predicts it
    logits_answer = lm.lm_head(out.gather(1, answer_at[..., None].expand(-1, -1, out.shape[-1])))[present]
    logits_eos = lm.lm_head(out.gather(1, packed.last[..., None].expand(-1, -1, out.shape[-1])))[present]
    answers = packed.ids.gather(1, packed.last)[present]
    return F.cross_entropy(logits_answer, answers) + F.cross_entropy(logits_eos, torch.full_like(answers, eos))


@torch.no_grad()
def evaluate(model_dir: Path | None = None, *, bundle=None, n_images: int = 60, method: str = "vanilla", budget: int = 576, preprocess: str = "pad") -> dict:
    """Accuracy (LLaVA rule) on the synthetic test split through prune_eval's fast path."""
    from omegaconf import OmegaConf

    from prune_eval.analysis import metrics
    from prune_eval.execution.engine import EvalSettings
    from prune_eval.execution.fast import evaluate_fast
    from prune_eval.methods import get_method
    from prune_eval.models import loading

    if bundle is None:
        cfg = OmegaConf.create({"name": "toy", "source": "toy", "path": str(model_dir) if model_dir else None, "tokenization": "hf"})
        bundle = loading.load(cfg, dtype=torch.float32, device=torch.device("cpu"))
    questions = synthetic.make_questions(n_images, seed=0)
    spec = get_method(method)
    params = spec.resolve({}, budget, bundle.geometry)
    answers = []
    settings = EvalSettings(batch_size=8, max_new_tokens=8, stop_when_decided=True, fast=True, batch_images=16)
    evaluate_fast(bundle, spec, params, questions, image_ops.synthetic_loader(), preprocess=preprocess, settings=settings, seed=0, on_answers=answers.extend)
    correct = [metrics.parse_llava(a.generation.text) == a.question.label for a in answers]
    exact = [a.generation.text in ("Yes", "No") for a in answers]
    return {"accuracy": sum(correct) / len(correct), "answers_yes_or_no": sum(exact) / len(exact), "questions": len(correct), "images": n_images}


def batch_of(seed: int, step: int, stage: str, images: int, image_processor):
    """The training batch of one step: a pure function of (seed, stage, step), so data loader workers
    can build batches in any order and a rerun sees the same data."""
    digest = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    first = int.from_bytes(digest[:4], "little") % 10_000_000 * images
    scenes = [synthetic.make_scene(TRAIN_DATA_SEED, first + i) for i in range(images)]
    pixel_values = image_ops.preprocess([synthetic.render_scene(s) for s in scenes], "pad", image_processor)
    targets = [patch_targets(s) for s in scenes]
    colors, shapes = torch.stack([t[0] for t in targets]), torch.stack([t[1] for t in targets])
    questions = synthetic.make_questions(images, seed=TRAIN_DATA_SEED, first_index=first)
    return pixel_values, colors, shapes, questions


class Batches(torch.utils.data.Dataset):
    def __init__(self, seed: int, stage: str, steps: int, images: int) -> None:
        self.seed, self.stage, self.steps, self.images = seed, stage, steps, images
        self.image_processor = tiny.build_image_processor()

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        return batch_of(self.seed, step, self.stage, self.images, self.image_processor)


def batches(seed: int, stage: str, steps: int, images: int, workers: int):
    loader = torch.utils.data.DataLoader(Batches(seed, stage, steps, images), batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    return iter(loader)


def _optimizer(parameters, lr: float, steps: int):
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    return optimizer, schedule


def _update(optimizer, schedule, loss: torch.Tensor, clip=None) -> None:
    """One optimizer step (gradient norm clipped to 1 over `clip`'s parameters, if given)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    schedule.step()


def train(out: Path, *, seed: int = 0, vision_steps: int = 1500, align_steps: int = 100, steps: int = 3000, images_per_step: int = 16,
          lr: float = 2e-3, question_lr_scale: float = 0.25, curriculum: float = 0.4, threads: int = 2, workers: int = 0, device: str = "cpu", log_every: int = 100,
          dims: dict | None = None) -> dict:
    """Train the toy from scratch and save it (safetensors, tokenizer, image processor, training.json).

    Stage 1 pre-trains the vision tower on dense patch labels (colour and shape of every patch), as
    CLIP's pre-training does for LLaVA; stage 2 trains everything on the POPE-style questions, keeping
    the dense loss at a small weight."""
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before CUDA starts)
    torch.use_deterministic_algorithms(True)  # e.g. memory-efficient attention's deterministic backward: same seed, same weights
    torch.manual_seed(seed)
    target = torch.device(device)
    dims = {**DIMS, **(dims or {})}
    model = tiny.build_model(toy_config(dims), init_seed=seed).to(target).train()
    model.requires_grad_(True)
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(dims["vision_hidden"], len(COLOR_NAMES)),
                                 "shape": torch.nn.Linear(dims["vision_hidden"], len(SHAPE_NAMES))}).to(target)
    tokenizer = tiny.build_tokenizer()
    lm = LanguageModel.from_llava(model)
    eos = tokenizer.eos_token_id
    history, started = [], time.time()

    def log(stage: str, step: int, **losses: torch.Tensor) -> None:
        history.append({"stage": stage, "step": step, **{k: round(float(v.detach()), 4) for k, v in losses.items()}, "seconds": round(time.time() - started, 1)})
        print(json.dumps(history[-1]), flush=True)

    optimizer, schedule = _optimizer(list(model.model.vision_tower.parameters()) + list(heads.parameters()), lr, vision_steps)
    for step, (pixel_values, colors, shapes, _) in enumerate(batches(seed, "vision", vision_steps, images_per_step, workers)):
        loss = dense_loss(heads, vision_features(model, pixel_values.to(target)), colors.to(target), shapes.to(target))
        _update(optimizer, schedule, loss)
        if step % log_every == 0 or step == vision_steps - 1:
            log("vision", step, dense=loss)
    probe = vision_probe(model, heads, target, seed)
    print(json.dumps({"stage": "vision probe", **probe}), flush=True)
    optimizer, schedule = _optimizer(list(model.model.multi_modal_projector.parameters()), lr, align_steps)
    for step, (pixel_values, colors, shapes, _) in enumerate(batches(seed, "align", align_steps, images_per_step, workers)):
        with torch.no_grad():
            vision = vision_features(model, pixel_values.to(target))
        loss = alignment_loss(model, lm, tokenizer, vision, colors.to(target), shapes.to(target))
        _update(optimizer, schedule, loss)
        if step % log_every == 0 or step == align_steps - 1:
            log("align", step, align=loss)
    trainable = [p for name, p in model.named_parameters() if not name.startswith("model.vision_tower")]
    optimizer, schedule = _optimizer(trainable, lr * question_lr_scale, steps)
    generator = torch.Generator().manual_seed(seed)
    for step, (pixel_values, colors, shapes, questions) in enumerate(batches(seed, "questions", steps, images_per_step, workers)):
        prefix, _, rows = training_rows(tokenizer, questions, model.config.image_token_id)
        with torch.no_grad():  # the vision tower stays as pre-trained, like LLaVA's frozen CLIP
            vision = vision_features(model, pixel_values.to(target))
        share = min(1.0, step / max(1, curriculum * steps)) ** 2  # background tokens seen: 0 -> all over the first `curriculum` of the steps
        keep = curriculum_tokens(colors.to(target), share, generator)
        answer = loss_of(model, lm, vision, prefix, rows, eos, keep)
        align = alignment_loss(model, lm, tokenizer, vision, colors.to(target), shapes.to(target))
        _update(optimizer, schedule, answer + 0.1 * align, clip=model.parameters())
        if step % log_every == 0 or step == steps - 1:
            log("questions", step, answer=answer, align=align, visual_tokens=torch.tensor(float(keep.shape[1])))
    model = model.to("cpu").eval().requires_grad_(False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tiny.build_image_processor().save_pretrained(out)
    result = {"seed": seed, "vision_steps": vision_steps, "align_steps": align_steps, "steps": steps, "question_lr_scale": question_lr_scale, "curriculum": curriculum, "images_per_step": images_per_step, "lr": lr,
              "device": str(target) if target.type == "cpu" else torch.cuda.get_device_name(target), "threads": threads,
              "train_data": {"generator": "pope-synthetic", "version": synthetic.GENERATOR_VERSION, "seed": TRAIN_DATA_SEED},
              "dims": dims, "vision_probe": probe, "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(time.time() - started, 1),
              "history": history, "torch": torch.__version__, "code": git_state(), "command": " ".join(sys.argv)}
    result["test"] = {"vanilla": evaluate(out, n_images=60)}
    (out / "training.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m prune_eval.toy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vision-steps", type=int, default=1500)
    t.add_argument("--align-steps", type=int, default=100)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--question-lr-scale", type=float, default=0.25)
    t.add_argument("--curriculum", type=float, default=0.4, help="share of the question steps over which background tokens go from none to all")
    t.add_argument("--dims", type=json.loads, default=None, help='JSON overrides of DIMS, e.g. \'{"text_hidden": 128, "text_heads": 2}\'')
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--images-per-step", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--workers", type=int, default=0, help="data loader processes building batches")
    t.add_argument("--device", default="cpu")
    e = sub.add_parser("evaluate")
    e.add_argument("--checkpoint", type=Path, default=None)
    e.add_argument("--images", type=int, default=60)
    e.add_argument("--method", default="vanilla")
    e.add_argument("--budget", type=int, default=576)
    args = parser.parse_args()
    if args.command == "train":
        result = train(args.out, seed=args.seed, vision_steps=args.vision_steps, align_steps=args.align_steps, steps=args.steps,
                       images_per_step=args.images_per_step, lr=args.lr, question_lr_scale=args.question_lr_scale, curriculum=args.curriculum, threads=args.threads,
                       workers=args.workers, device=args.device, log_every=args.log_every, dims=args.dims)
        print(json.dumps(result["test"]))
    else:
        print(json.dumps(evaluate(args.checkpoint, n_images=args.images, method=args.method, budget=args.budget)))


if __name__ == "__main__":
    main()
