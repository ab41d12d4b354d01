"""The real from_pretrained path, exercised with a tiny checkpoint saved to disk by the test."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from prune_eval.errors import PruneEvalError
from prune_eval.models import loading

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)


def saved_checkpoint(bundle, path):
    bundle.model.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    bundle.image_processor.save_pretrained(path)
    return path


def path_cfg(path):
    return OmegaConf.create({"name": "local", "source": "hub", "id": "unused/unused", "path": str(path), "revision": None, "tokenization": "hf"})


def test_local_checkpoint_loads_with_identical_outputs(tiny_bundle, tmp_path) -> None:
    path = saved_checkpoint(tiny_bundle, tmp_path / "ckpt")
    cfg = path_cfg(path)
    loading.check_available(cfg)
    loaded = loading.load(cfg, dtype=torch.float32, device=torch.device("cpu"))
    assert loaded.geometry == tiny_bundle.geometry
    assert loaded.info["checkpoint"] == str(path) and loaded.info["source"] == "path"
    ids = tiny_bundle.tokenizer("USER : <image> Is there a red circle ?", return_tensors="pt").input_ids
    ids = torch.cat([ids[:, :3], torch.full((1, 576), tiny_bundle.image_token_id), ids[:, 4:]], 1)
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids, pixel_values=pixels).logits, tiny_bundle.model(input_ids=ids, pixel_values=pixels).logits)
    assert loaded.tokenizer("Is there a red circle ?").input_ids == tiny_bundle.tokenizer("Is there a red circle ?").input_ids


def test_not_a_llava_checkpoint(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PruneEvalError, match="holds a 'bert' checkpoint; expected a LLaVA checkpoint"):
        loading.check_available(path_cfg(tmp_path))


def test_config_without_weights(tiny_bundle, tmp_path) -> None:
    tiny_bundle.model.config.save_pretrained(tmp_path)
    with pytest.raises(PruneEvalError, match="has a config but no weights"):
        loading.check_available(path_cfg(tmp_path))


def test_uncached_hub_id(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = OmegaConf.create({"name": "llava-1.5-7b", "source": "hub", "id": "llava-hf/llava-1.5-7b-hf", "path": None, "revision": None})
    with pytest.raises(PruneEvalError, match="not in the Hugging Face cache"):
        loading.check_available(cfg)


# config.json as llava-hf lays it out for LLaVA-1.5-7B: text_config leaves Llama's shapes to LlamaConfig's defaults
LLAVA_HF_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
    "projector_hidden_act": "gelu", "tie_word_embeddings": False, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "vocab_size": 32064,
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                    "model_type": "llama", "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
}


def _with(config: dict, part: str, **changes) -> dict:
    changed = json.loads(json.dumps(config))
    changed[part].update(changes)
    return changed


@pytest.mark.parametrize("config", [
    LLAVA_HF_7B,
    _with(LLAVA_HF_7B, "text_config", hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_hidden_layers=40),
    _with(LLAVA_HF_7B, "vision_config", image_size=224, patch_size=14, num_hidden_layers=3, num_attention_heads=4),
    "tiny",
])
def test_geometry_read_from_config_json_is_llava_configs(config, tmp_path) -> None:
    """The sweep process reads a checkpoint's shapes from config.json without transformers; they
    must be the ones LlavaConfig (what the worker loads) gives for the same file."""
    from transformers import LlavaConfig

    from prune_eval.config import geometry_from_config_json
    from prune_eval.methods import ModelGeometry
    from prune_eval.models import tiny

    if config == "tiny":
        config = tiny.build_config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = ModelGeometry.from_config(LlavaConfig.from_pretrained(tmp_path))
    assert geometry_from_config_json(json.loads((tmp_path / "config.json").read_text())) == expected


def test_geometry_left_to_transformers_defaults_is_not_guessed() -> None:
    """A vision shape left out (CLIP's defaults depend on the transformers version) or a text model
    other than Llama: None, and model_geometry asks LlavaConfig."""
    from prune_eval.config import geometry_from_config_json

    no_image_size = json.loads(json.dumps(LLAVA_HF_7B))
    del no_image_size["vision_config"]["image_size"]
    assert geometry_from_config_json(no_image_size) is None
    assert geometry_from_config_json(_with(LLAVA_HF_7B, "text_config", model_type="mistral")) is None
    assert geometry_from_config_json(LLAVA_HF_7B) is not None
