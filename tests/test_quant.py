"""Precision and bitsandbytes quantization on the CPU (tiny model, widths multiples of 64)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_DEMO, run_cli, tiny_model_cfg
from omegaconf import OmegaConf

from prune_eval.data import images, synthetic
from prune_eval.execution.engine import EvalSettings, generate_rows, tokenized_prompts, visual_tokens
from prune_eval.errors import PruneEvalError
from prune_eval.methods import get_method
from prune_eval.models import loading
from prune_eval.models.quant import check_backend, precision_of

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

SETTINGS = EvalSettings(batch_size=2, max_new_tokens=2, stop_when_decided=False, fast=False)
QUANTS = {
    "fp32": {"name": "fp32", "dtype": "float32"},
    "fp16": {"name": "fp16", "dtype": "float16"},
    "bf16": {"name": "bf16", "dtype": "bfloat16"},
    "int8": {"name": "int8", "dtype": "float32", "scope": "llm", "threshold": 6.0},
    "nf4": {"name": "nf4", "dtype": "float32", "compute_dtype": "float32", "double_quant": True, "scope": "llm"},
}
# Relative L2 error of the first answer token's logits against fp32 on this random tiny model
# (measured on CPU, 2026-11-24: fp16 0.0008, bf16 0.007, int8 0.011, nf4 0.15): the stated
# tolerances are about 3x those, and fp32 itself must be exact.
TOLERANCE = {"fp16": 0.005, "bf16": 0.03, "int8": 0.04, "nf4": 0.4}


def load(quant: dict, **dims):
    precision = precision_of(OmegaConf.create(quant))
    return loading.load(tiny_model_cfg(**dims), dtype=precision.dtype, device=torch.device("cpu"), quantization_config=precision.quantization_config)


def first_logits(bundle, method: str = "vanilla", budget: int = 64):
    questions = synthetic.make_questions(1, seed=0)[:2]
    spec = get_method(method)
    params = spec.resolve({"version": "v1.5"} if method == "sparsevlm" else {}, budget, bundle.geometry)
    pixels = images.preprocess([synthetic.render_image(0, 0)] * 2, "pad", bundle.image_processor)
    visual = visual_tokens(bundle, spec, params, pixels, [0, 0])
    tokenized = tokenized_prompts(bundle, questions)
    hook = spec.make_hook(params, bundle, [0, 1], len(tokenized.prefix), visual.shape[1]) if spec.make_hook else None
    return generate_rows(bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS, hook=hook)


@pytest.fixture(scope="module")
def reference():
    return torch.stack([g.first_logits for g in first_logits(load(QUANTS["fp32"]))])


@pytest.mark.parametrize("name", sorted(QUANTS))
def test_every_quant_loads_and_answers_close_to_fp32(name, reference) -> None:
    bundle = load(QUANTS[name])
    generations = first_logits(bundle)
    logits = torch.stack([g.first_logits for g in generations]).float()
    assert torch.isfinite(logits).all() and all(g.token_ids for g in generations)
    error = float((logits - reference).norm() / reference.norm())
    assert error <= TOLERANCE.get(name, 0.0), f"{name}: relative logit error {error:.4f}"
    quantized = bundle.info["quantized_modules"]
    if name in ("int8", "nf4"):
        assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized)
        assert len(quantized) == 8 * 7  # q, k, v, o, gate, up, down in each of the 8 layers
    else:
        assert quantized == []


@pytest.mark.parametrize("method", ["visionzip", "sparsevlm"])
def test_pruning_methods_run_under_4bit_everywhere(method) -> None:
    bundle = load({**QUANTS["nf4"], "scope": "all"})
    assert any(n.startswith("model.vision_tower") for n in bundle.info["quantized_modules"])
    generations = first_logits(bundle, method)
    assert all(torch.isfinite(g.first_logits).all() for g in generations)


def test_nf4_without_a_usable_backend_is_a_clear_error() -> None:
    with pytest.raises(PruneEvalError, match="quant=nf4 on the CPU needs layer widths that are multiples of 64.*this model has \\[96\\]"):
        check_backend(precision_of(OmegaConf.create(QUANTS["nf4"])), torch.device("cpu"), (96, 192))
    check_backend(precision_of(OmegaConf.create(QUANTS["int8"])), torch.device("cpu"), (96, 192))


@pytest.mark.slow
def test_quantized_cell_summary_records_what_was_quantized(tmp_path) -> None:
    result = run_cli([*FAST_DEMO, "quant=int8", "data.n_images=1", "quant.dtype=float32"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary_path,) = (tmp_path / "outputs" / "demo").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["model"]["quantization"]["name"] == "int8" and summary["model"]["quantization"]["n_quantized_modules"] == 6 * 7  # the toy's 6 LLM layers x q, k, v, o, gate, up, down
    assert summary["model"]["quantization"]["skipped_modules"] == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    assert summary["model"]["memory_footprint_bytes"] > 0 and summary["experiment"]["quant"]["name"] == "int8"
