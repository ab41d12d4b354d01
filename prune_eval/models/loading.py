"""Load a LLaVA checkpoint (hub id, local path, the original LLaVA layout, or the tiny model built in
code) for evaluation.

`check_available` runs before any job starts, so a missing checkpoint is one clear message in the
submitting process instead of a traceback on a GPU node. `load` returns a `ModelBundle`: the model,
its tokenizer and image processor, the LLM parts our decoder loop drives, and an `info` dict that
goes into every cell summary (checkpoint, revision, dtype, quantized modules, memory, processor).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from prune_eval.errors import PruneEvalError
from prune_eval.methods import ModelGeometry
from prune_eval.models import original, tiny
from prune_eval.models.checkpoints import (  # noqa: F401  (torch-free, for planning; re-exported)
    SOURCES, TOY_DIR, WEIGHT_PATTERNS, check_available, check_local_checkpoint, checkpoint_location, source_of)
from prune_eval.models.llm import LanguageModel
from prune_eval.models.transfer import move_to_device
from prune_eval.specs import ModelSpec

if TYPE_CHECKING:  # the modeling code is imported where a model is loaded: planning a sweep needs only configs
    from transformers import LlavaForConditionalGeneration


@dataclass
class ModelBundle:
    model: LlavaForConditionalGeneration
    tokenizer: Any
    image_processor: Any
    lm: LanguageModel
    geometry: ModelGeometry
    device: torch.device
    dtype: torch.dtype
    tokenization: str
    feature_layer: int
    image_token_id: int
    info: dict = field(default_factory=dict)

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PruneEvalError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules bitsandbytes replaced (Linear8bitLt / Linear4bit)."""
    return [name for name, module in model.named_modules() if type(module).__name__ in ("Linear8bitLt", "Linear4bit")]


def _load_pretrained(spec: ModelSpec, dtype: torch.dtype, device: torch.device, quantization_config) -> tuple:
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    location = checkpoint_location(spec)
    common = {"revision": spec.revision, "local_files_only": not spec.allow_download}
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            location,
            dtype=dtype,
            device_map={"": str(device)} if quantization_config is not None else None,
            quantization_config=quantization_config,
            attn_implementation="sdpa",
            **common,
        )
        tokenizer = AutoTokenizer.from_pretrained(location, **common)
        image_processor = CLIPImageProcessorPil.from_pretrained(location, **common)
    except OSError as e:
        raise PruneEvalError(f"cannot load checkpoint {location}: {str(e).splitlines()[0]}") from None
    if quantization_config is None:
        model = move_to_device(model, device)
    return model, tokenizer, image_processor


def load(model: ModelSpec, *, dtype: torch.dtype, device: torch.device, quantization_config=None) -> ModelBundle:
    """Load the checkpoint a ModelSpec (or a `model` config node, converted) describes."""
    started = time.perf_counter()
    spec = ModelSpec.of(model)
    source = spec.source
    if source == "tiny":
        config = tiny.build_config(**dict(spec.dims))
        model = tiny.build_model(config, init_seed=int(spec.init_seed))
        if quantization_config is not None:  # bitsandbytes quantizes while loading: go through disk
            from transformers import LlavaForConditionalGeneration

            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                model = LlavaForConditionalGeneration.from_pretrained(
                    folder, dtype=dtype, device_map={"": str(device)}, quantization_config=quantization_config, attn_implementation="sdpa"
                )
        else:
            model = model.to(device=device, dtype=dtype)
        tokenizer, image_processor = tiny.build_tokenizer(), tiny.build_image_processor()
    elif source == "original":
        model, tokenizer, image_processor, extra = original.load(spec, dtype=dtype, device=device, quantization_config=quantization_config)
    else:
        model, tokenizer, image_processor = _load_pretrained(spec, dtype, device, quantization_config)
    model.eval().requires_grad_(False)
    info = {
        "name": spec.name,
        "source": source,
        "checkpoint": checkpoint_location(spec) if source != "tiny" else "tiny (random, built in code)",
        "revision": spec.revision,
        "commit": getattr(model.config, "_commit_hash", None),
        "init_seed": spec.init_seed if source == "tiny" else None,
        "load_seconds": round(time.perf_counter() - started, 3),
        "tokenization": spec.tokenization,
    }
    if source == "original":
        info.update(extra)  # commit, vision tower, weights hashes, the checkpoint's mm_* fields
    return make_bundle(model, tokenizer, image_processor, dtype=dtype, device=device, tokenization=info["tokenization"], info=info)


def make_bundle(model, tokenizer, image_processor, *, dtype: torch.dtype, device: torch.device, tokenization: str = "hf", info: dict | None = None) -> ModelBundle:
    """Wrap a loaded LLaVA for the evaluation loop; `info` gains what every summary records."""
    info = dict(info or {})
    info.update(
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        memory_footprint_bytes=int(model.get_memory_footprint()),
        quantized_modules=quantized_modules(model),
        tokenizer=type(tokenizer).__name__,
        image_processor=type(image_processor).__name__,
        attn_implementation=model.config.text_config._attn_implementation,
    )
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        lm=LanguageModel.from_llava(model),
        geometry=ModelGeometry.from_config(model.config),
        device=device,
        dtype=dtype,
        tokenization=tokenization,
        feature_layer=int(model.config.vision_feature_layer),
        image_token_id=int(model.config.image_token_id),
        info=info,
    )
