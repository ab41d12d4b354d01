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
