"""Load a LLaVA checkpoint (hub id, local path, the original LLaVA layout, or the tiny model built in
code) for evaluation.

`check_available` runs before any job starts, so a missing checkpoint is one clear message in the
submitting process instead of a traceback on a GPU node. `load` returns a `ModelBundle`: the model,
its tokenizer and image processor, the LLM parts our decoder loop drives, and an `info` dict that
goes into every cell summary (checkpoint, revision, dtype, quantized modules, memory, processor).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prune_eval.errors import PruneEvalError
from prune_eval.methods import ModelGeometry
from prune_eval.models import original, tiny
from prune_eval.models.llm import LanguageModel
from prune_eval.specs import ModelSpec

if TYPE_CHECKING:  # the modeling code is imported where a model is loaded: planning a sweep needs only configs
    from transformers import LlavaForConditionalGeneration

SOURCES = ("hub", "path", "tiny", "toy", "original")  # original: LLaVA's own layout (models/original.py)
TOY_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy"  # trained by python -m prune_eval.toy train
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


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


def checkpoint_location(model: ModelSpec) -> str:
    """The local path if one is set, else the shipped toy weights or the hub id. `model`: a ModelSpec
    (or a `model` config node, converted)."""
    model = ModelSpec.of(model)
    if model.path:
        return model.path
    return str(TOY_DIR) if model.source == "toy" else str(model.id)


def source_of(model: ModelSpec) -> str:
    return ModelSpec.of(model).source


def check_local_checkpoint(path: Path) -> None:
    """A directory with a LLaVA config and weights, or a clear error saying what is wrong."""
    if not path.is_dir():
        raise PruneEvalError(f"model.path={path} does not exist; download the weights there or point model.path at them")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PruneEvalError(f"model.path={path} is not a checkpoint: no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError:
        raise PruneEvalError(f"{config_file} is not valid JSON") from None
    if model_type != "llava":
        raise PruneEvalError(f"model.path={path} holds a '{model_type}' checkpoint; expected a LLaVA checkpoint (model_type 'llava')")
    if original.layout_of(json.loads(config_file.read_text())) == "original":
        raise PruneEvalError(f"model.path={path} holds an original LLaVA checkpoint (LlavaLlamaForCausalLM layout); "
                             f"use model=llava-1.5-7b-original (or -13b-original) with model.path={path}")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise PruneEvalError(f"model.path={path} has a config but no weights (*.safetensors or *.bin)")


def check_available(model: ModelSpec) -> None:
    """Fail early, naming the checkpoint and how to get it, if it cannot be loaded here."""
    model = ModelSpec.of(model)
    if model.source == "tiny":
        return
    if model.source == "original":
        original.check_available(model)
        return
    if model.source in ("path", "toy"):
        check_local_checkpoint(Path(checkpoint_location(model)).expanduser())
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model.id, "config.json", revision=model.revision)
    if not isinstance(cached, str) and not model.allow_download:
        raise PruneEvalError(
            f"weights for {model.id} are not in the Hugging Face cache; download them first with "
            f"`python -m prune_eval.assets weights --model {model.name}` (or `hf download {model.id}`), "
            f"or set model.path=/local/dir, or model.allow_download=true to download inside the job"
        )


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
        model = model.to(device)
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
