"""Where a model's checkpoint is and whether it can be loaded here, from its files alone.

Torch-free and transformers-free: the sweep process plans every job (checks that the weights exist,
reads the model's shapes from config.json) without importing transformers' LLaVA, which costs seconds
per process (with torch: 5-9 s in the workers' logs of BENCHMARKS.md's resident-workers runs).
prune_eval.models.loading re-exports these names and loads the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from prune_eval.errors import PruneEvalError
from prune_eval.specs import ModelSpec

SOURCES = ("hub", "path", "tiny", "toy", "original")  # original: LLaVA's own layout (models/original.py)
TOY_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy"  # trained by python -m prune_eval.toy train
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def layout_of(config: dict) -> str:
    """'llava-hf' (nested text/vision configs), 'original' (LLaVA's flat config with mm_* fields) or
    the config's model_type."""
    if "text_config" in config or "vision_config" in config:
        return "llava-hf" if config.get("model_type") == "llava" else str(config.get("model_type"))
    if "mm_vision_tower" in config or "LlavaLlamaForCausalLM" in (config.get("architectures") or []):
        return "original"
    return str(config.get("model_type"))


def checkpoint_location(model: ModelSpec) -> str:
    """The local path if one is set, else the shipped toy weights or the hub id. `model`: a ModelSpec
    (or a `model` config node, converted)."""
    model = ModelSpec.of(model)
    if model.path:
        return model.path
    return str(TOY_DIR) if model.source == "toy" else str(model.id)


def source_of(model: ModelSpec) -> str:
    return ModelSpec.of(model).source


def read_config(folder: Path, label: str | None = None) -> dict:
    """The folder's config.json as a dict; PruneEvalError (naming `label`, else the folder) when it is
    missing, not JSON or not a JSON object."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PruneEvalError(f"{label or folder} is not a checkpoint: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        raise PruneEvalError(f"{config_file} is not valid JSON") from None
    if not isinstance(config, dict):
        raise PruneEvalError(f"{config_file} is not a JSON object")
    return config


def check_local_checkpoint(path: Path) -> dict:
    """A directory with a LLaVA config and weights (returns the config), or a clear error saying what is wrong."""
    if not path.is_dir():
        raise PruneEvalError(f"model.path={path} does not exist; download the weights there or point model.path at them")
    config = read_config(path, f"model.path={path}")
    model_type = config.get("model_type")
    if model_type != "llava":
        raise PruneEvalError(f"model.path={path} holds a '{model_type}' checkpoint; expected a LLaVA checkpoint (model_type 'llava')")
    if layout_of(config) == "original":
        raise PruneEvalError(f"model.path={path} holds an original LLaVA checkpoint (LlavaLlamaForCausalLM layout); "
                             f"use model=llava-1.5-7b-original (or -13b-original) with model.path={path}")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise PruneEvalError(f"model.path={path} has a config but no weights (*.safetensors or *.bin)")
    return config


def check_available(model: ModelSpec) -> dict | None:
    """Fail early, naming the checkpoint and how to get it, if it cannot be loaded here. Returns the
    checkpoint's config.json, parsed, where it is on this machine (a local path, the shipped toy, the
    Hugging Face cache); None for the tiny model, the original layout (two configs:
    prune_eval.models.original) and a hub checkpoint left to download inside the job."""
    model = ModelSpec.of(model)
    if model.source == "tiny":
        return None
    if model.source == "original":
        from prune_eval.models import original

        original.check_available(model)
        return None
    if model.source in ("path", "toy"):
        return check_local_checkpoint(Path(checkpoint_location(model)).expanduser())
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model.id, "config.json", revision=model.revision)
    if isinstance(cached, str):
        return read_config(Path(cached).parent)
    if not model.allow_download:
        raise PruneEvalError(
            f"weights for {model.id} are not in the Hugging Face cache; download them first with "
            f"`python -m prune_eval.assets weights --model {model.name}` (or `hf download {model.id}`), "
            f"or set model.path=/local/dir, or model.allow_download=true to download inside the job"
        )
    return None
