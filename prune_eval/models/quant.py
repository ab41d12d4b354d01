"""Precision and quantization: the `quant` config group's registry.

Each entry turns its YAML into a `Precision`: the dtype the model computes in, and for int8/nf4 a
bitsandbytes config. What is quantized is an experimental variable, so it is explicit and recorded:
by default the LLM only. bitsandbytes' skip list is matched against module-name prefixes and a
given list replaces its default (which skips lm_head only), so the default here names the vision
tower, projector and lm_head (../shared/notes/hf-llava.md, "bitsandbytes").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prune_eval.errors import PruneEvalError
from prune_eval.registry import Registry

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LLM_ONLY_SKIP = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
SCOPES = ("llm", "all")


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype
    quantization_config: object | None = None
    skipped_modules: list[str] = field(default_factory=list)


QUANTS: Registry[Callable[..., Precision]] = Registry("quant")


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PruneEvalError(f"unknown dtype '{name}'; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def _skip_list(quant_cfg) -> list[str]:
    scope = quant_cfg.get("scope", "llm")
    if scope not in SCOPES:
        raise PruneEvalError(f"quant.scope={scope}; allowed: {', '.join(SCOPES)} (llm: vision tower, projector and lm_head stay in dtype)")
    return list(LLM_ONLY_SKIP) if scope == "llm" else ["lm_head"]


def _plain(quant_cfg) -> Precision:
    return Precision(quant_cfg.name, dtype_of(quant_cfg.dtype))


for _name in ("fp32", "fp16", "bf16"):
    QUANTS.register(_name)(_plain)


def _threshold(quant_cfg) -> float:
    value = quant_cfg.get("threshold", 6.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise PruneEvalError(f"quant.threshold={value}; must be a number >= 0 (LLM.int8()'s outlier threshold, default 6.0)")
    return float(value)


@QUANTS.register("int8")
def int8(quant_cfg) -> Precision:
    from transformers import BitsAndBytesConfig

    skip = _skip_list(quant_cfg)
    config = BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=_threshold(quant_cfg),
        llm_int8_skip_modules=skip,
    )
    return Precision(quant_cfg.name, dtype_of(quant_cfg.dtype), config, skip)


@QUANTS.register("nf4")
def nf4(quant_cfg) -> Precision:
    from transformers import BitsAndBytesConfig

    skip = _skip_list(quant_cfg)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=bool(quant_cfg.get("double_quant", True)),
        bnb_4bit_compute_dtype=dtype_of(quant_cfg.get("compute_dtype", quant_cfg.dtype)),
        llm_int8_skip_modules=skip,
    )
    return Precision(quant_cfg.name, dtype_of(quant_cfg.dtype), config, skip)


def precision_of(quant_cfg) -> Precision:
    return QUANTS.get(str(quant_cfg.name))(quant_cfg)


def check_backend(precision: Precision, device: torch.device, widths: tuple[int, ...]) -> None:
    """bitsandbytes must be usable on this device before a job spends time loading a model.

    `widths` are the quantized layers' in/out sizes (LLM hidden and MLP widths): bitsandbytes'
    CPU 4-bit kernels need multiples of 64 and fail deep inside a forward otherwise.
    """
    if precision.quantization_config is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        raise PruneEvalError(f"quant={precision.name} needs bitsandbytes, which cannot be used here ({type(e).__name__}: {e}); pip install bitsandbytes, or use quant=fp16/bf16/fp32") from None
    if device.type == "cpu" and precision.name == "nf4":
        bad = sorted({w for w in widths if w % 64})
        if bad:
            raise PruneEvalError(f"quant=nf4 on the CPU needs layer widths that are multiples of 64 (bitsandbytes' CPU 4-bit kernels); this model has {bad}; run on a GPU or use quant=int8")
    if device.type == "cuda":
        from bitsandbytes.cextension import lib

        if lib is None or not getattr(lib, "compiled_with_cuda", True):
            raise PruneEvalError(f"quant={precision.name} on {device}: this bitsandbytes has no CUDA backend; install a CUDA build of bitsandbytes")
