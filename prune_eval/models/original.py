"""LLaVA-1.5 in its original layout (liuhaotian/llava-v1.5-*), loaded into transformers'
LlavaForConditionalGeneration by renaming its weights at load time (no conversion step, no copy).

The original checkpoint is what LLaVA's own code loads (haotian-liu/LLaVA: llava/model/builder.py,
llava/model/llava_arch.py, llava/model/multimodal_encoder/clip_encoder.py,
llava/model/multimodal_projector/builder.py):
- `LlavaLlamaForCausalLM`: a Llama LLM under `model.*` (embed_tokens, layers, norm) and `lm_head`,
  the projector `model.mm_projector` = nn.Sequential(Linear, GELU, Linear) ("mlp2x_gelu": keys .0/.2);
- a flat config.json (Llama fields + `mm_*` fields), model_type "llava" like llava-hf's;
- NO usable vision weights: the tower is built with delay_load and filled by
  `CLIPVisionModel.from_pretrained(config.mm_vision_tower)`, i.e. openai/clip-vit-large-patch14-336.
  Any `model.vision_tower.*` keys in the checkpoint are ignored, as LLaVA ignores them. The tower is
  therefore a second checkpoint here (`model.vision_tower` / `model.vision_tower_path`), its image
  processor (CLIP 336, bicubic, centre crop) comes from the same folder;
- features: hidden_states[mm_vision_select_layer = -2], 'patch' = drop CLS; image_aspect_ratio 'pad'
  (the `preprocess=pad` choice); the slow sentencepiece tokenizer with `tokenizer_image_token`
  (prune_eval.models.sentencepiece_llama, `tokenization: llava`).

The renaming follows transformers' convert_llava_weights_to_hf.py (KEYS_TO_MODIFY_MAPPING), written for
transformers 5's module names. Unlike that script, nothing is added to the vocabulary: llava-hf appends
`<image>` (32000) and `<pad>` and pads the embeddings to 32064 rows with sampled vectors; here the
embedding and lm_head keep the checkpoint's 32000 rows, so the logits are the original model's. The
config's `image_token_id` is set to the vocabulary size (32000, llava-hf's id for `<image>`); it is never
embedded: LLaVA splices the image features at IMAGE_TOKEN_INDEX=-200, and prune_eval's loop builds the
rows as prefix ids + visual features + suffix ids (prune_eval.models.prompt).

Recorded per load (`info`): the checkpoint and vision tower (hub id or folder) with the commit of
their snapshot, the original config's mm_* fields, the tokenizer's legacy flag, and a weights hash:
sha256 over "name size sha256" lines of the weight files. A file's sha256 is free when it sits in the
Hugging Face cache (LFS blobs are named by their sha256); a file elsewhere is read once and hashed
(about 10 s per GB-scale file on a local disk: a local 7B copy costs one pass over 14 GB per load).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig  # configs only: the modeling code is imported to load

from prune_eval.errors import PruneEvalError
from prune_eval.models.checkpoints import layout_of, read_config
from prune_eval.models.sentencepiece_llama import SentencePieceLlamaTokenizer
from prune_eval.models.transfer import move_to_device
from prune_eval.execution.records import sha256_file
from prune_eval.specs import ModelSpec

# original key prefix -> LlavaForConditionalGeneration (transformers 5) key prefix
LLAVA_RENAMES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
LLAVA_IGNORED = ("model.vision_tower.",)  # LLaVA reloads the tower from mm_vision_tower
VISION_RENAMES = (("vision_model.", "model.vision_tower."),)
# a full CLIPModel checkpoint also holds the text tower and the projections; old ones save position_ids
VISION_IGNORED = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")
BUFFER_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers old transformers versions saved
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "rope_scaling", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id")
RECORDED_FIELDS = ("mm_vision_tower", "mm_vision_select_layer", "mm_vision_select_feature", "mm_projector_type",
                   "image_aspect_ratio", "mm_patch_merge_type", "mm_use_im_start_end", "mm_use_im_patch_token")
SUPPORTED = {  # field: (allowed values, default when absent)
    "mm_projector_type": (("mlp2x_gelu",), "linear"),
    "mm_vision_select_feature": (("patch",), "patch"),
    "mm_use_im_start_end": ((False,), False),
    "mm_use_im_patch_token": ((False,), True),
    "mm_patch_merge_type": (("flat",), "flat"),
    "unfreeze_mm_vision_tower": ((False,), False),
}


# ----------------------------------------------------------------------------------------------
# Recognising folders
def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: an index's shards, else model*.safetensors, else pytorch_model*.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted({folder / name for name in json.loads(index.read_text()).get("weight_map", {}).values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise PruneEvalError(f"{folder}: {index_name} lists {len(missing)} missing weight file(s), e.g. {missing[0]}")
            return shards
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    return []


def check_checkpoint_dir(folder: Path, *, label: str | None = None) -> dict:
    """The original LLaVA config of `folder`, or a PruneEvalError saying what the folder is instead.
    `label` names the folder in messages (default 'model.path=FOLDER')."""
    label = label or f"model.path={folder}"
    if not folder.is_dir():
        raise PruneEvalError(f"{label} does not exist; download the weights there or point model.path at them")
    config = read_config(folder)
    layout = layout_of(config)
    if layout == "llava-hf":
        raise PruneEvalError(f"{label} holds a checkpoint in the llava-hf layout; use model=llava-1.5-7b (or -13b) with "
                             f"model.path={folder}, or point model.path at an original LLaVA checkpoint")
    if layout != "original":
        raise PruneEvalError(f"{label} holds a '{layout}' checkpoint; expected an original LLaVA checkpoint "
                             f"(LlavaLlamaForCausalLM, config.json with mm_vision_tower), e.g. liuhaotian/llava-v1.5-7b")
    for field, (allowed, default) in SUPPORTED.items():
        value = config.get(field, default)
        if value not in allowed:
            raise PruneEvalError(f"{label}: {field}={value!r} is not supported (LLaVA-1.5: {allowed[0]!r}); only LLaVA-1.5's "
                                 f"projector, patch features and plain image tokens are")
    missing = [f for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "mm_hidden_size") if f not in config]
    if missing:
        raise PruneEvalError(f"{label}: config.json lacks {', '.join(missing)}; not a complete LLaVA config")
    if not weight_files(folder):
        raise PruneEvalError(f"{label} has a config but no weights (model*.safetensors or pytorch_model*.bin)")
    if not (folder / "tokenizer.model").is_file():
        raise PruneEvalError(f"{label} has no tokenizer.model (LLaMA's sentencepiece model)")
    return config


def check_vision_dir(folder: Path, *, label: str | None = None) -> CLIPVisionConfig:
    """The CLIP vision config of `folder`, or a PruneEvalError (default label 'model.vision_tower_path=FOLDER')."""
    label = label or f"model.vision_tower_path={folder}"
    if not folder.is_dir():
        raise PruneEvalError(f"{label} does not exist; download the CLIP vision tower there or point model.vision_tower_path at it")
    model_type = read_config(folder).get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise PruneEvalError(f"{label} holds a '{model_type}' checkpoint; expected a CLIP model "
                             f"(LLaVA-1.5: openai/clip-vit-large-patch14-336)")
    if not weight_files(folder):
        raise PruneEvalError(f"{label} has a config but no weights (model*.safetensors or pytorch_model*.bin)")
    if not (folder / "preprocessor_config.json").is_file():
        raise PruneEvalError(f"{label} has no preprocessor_config.json (CLIP's image processor)")
    return CLIPVisionConfig.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# Finding the two checkpoints
@dataclass(frozen=True)
class Located:
    where: str  # hub id or folder, as configured
    path: Path
    commit: str | None


PARTS = {  # part -> (id key, path key, revision key, what)
    "checkpoint": ("id", "path", "revision", "LLaVA checkpoint"),
    "vision_tower": ("vision_tower", "vision_tower_path", "vision_tower_revision", "CLIP vision tower"),
}


def locate(model: ModelSpec, part: str, *, download: bool = False) -> Located:
    """A local folder for `part` of the model: its configured path, or its hub snapshot in the cache
    (downloaded first when `download`)."""
    from prune_eval.assets import weights

    id_key, path_key, revision_key, what = PARTS[part]
    if getattr(model, path_key):
        path = Path(str(getattr(model, path_key))).expanduser()
        return Located(str(path), path, None)
    repo_id, revision = getattr(model, id_key), getattr(model, revision_key)
    if not repo_id:
        raise PruneEvalError(f"model '{model.name}' names no {what}: set model.{id_key} (a hub id) or model.{path_key}")
    snapshot = weights.fetch(repo_id, revision=revision, setting=f"model.{path_key}") if download else weights.cached_snapshot(repo_id, revision)
    if snapshot is None:
        raise PruneEvalError(
            f"weights for {repo_id} are not in the Hugging Face cache; download them first with "
            f"`python -m prune_eval.assets weights --model {model.name}`, or set model.{path_key}=/local/dir, "
            f"or model.allow_download=true to download inside the job"
        )
    return Located(repo_id, snapshot.path, snapshot.commit)


def check_options(model: ModelSpec) -> None:
    if model.tokenization != "llava":
        raise PruneEvalError(f"model.tokenization={model.tokenization} for model '{model.name}'; the original checkpoint's "
                             f"tokenizer has no <image> token, so only LLaVA's own tokenization works: model.tokenization=llava")


def _label(model: ModelSpec, part: str, located: Located) -> str:
    path_key = PARTS[part][1]
    if getattr(model, path_key):
        return f"model.{path_key}={located.path}"
    return f"the cached snapshot of {located.where} ({located.path})"


def check_available(model: ModelSpec) -> tuple[dict, CLIPVisionConfig]:
    """Both checkpoints present and of the right kind (no weights read); returns their configs.
    With model.allow_download=true a missing hub checkpoint is downloaded here, before any job starts.
    `model`: a ModelSpec (or a `model` config node, converted)."""
    model = ModelSpec.of(model)
    check_options(model)
    checkpoint = locate(model, "checkpoint", download=model.allow_download)
    original = check_checkpoint_dir(checkpoint.path, label=_label(model, "checkpoint", checkpoint))
    tower = locate(model, "vision_tower", download=model.allow_download)
    vision = check_vision_dir(tower.path, label=_label(model, "vision_tower", tower))
    if not model.vision_tower_path and original.get("mm_vision_tower") not in (None, model.vision_tower):
        raise PruneEvalError(f"{checkpoint.where} was trained with the vision tower {original['mm_vision_tower']} but "
                             f"model.vision_tower={model.vision_tower}; set model.vision_tower={original['mm_vision_tower']}")
    return original, vision


# ----------------------------------------------------------------------------------------------
# Config and weights
def llava_config(original: dict, vision: CLIPVisionConfig) -> LlavaConfig:
    """The LlavaConfig equivalent to an original LLaVA config.json and its CLIP tower's config."""
    if original["mm_hidden_size"] != vision.hidden_size:
        raise PruneEvalError(f"the checkpoint's projector expects {original['mm_hidden_size']}-d vision features, "
                             f"the vision tower gives {vision.hidden_size}-d: another tower than it was trained with")
    text = LlamaConfig(**{k: original[k] for k in LLAMA_FIELDS if original.get(k) is not None}, tie_word_embeddings=False)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=int(original["vocab_size"]),  # outside the vocabulary: never embedded (see module doc)
        projector_hidden_act="gelu",  # nn.GELU() in LLaVA's mlp2x_gelu
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default",  # 'patch': drop CLS
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        tie_word_embeddings=False,
    )


def config_of(model: ModelSpec) -> LlavaConfig:
    """The model's LlavaConfig from the two config files alone (validation, geometry)."""
    return llava_config(*check_available(model))


def rename(key: str, renames: tuple, ignored: tuple) -> str | None:
    """The transformers key for an original key; None for keys LLaVA does not use; the key itself
    (left for the unexpected-key check) when no rule matches."""
    if key.startswith(ignored) or key.endswith(BUFFER_SUFFIXES):
        return None
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return state


def converted_state_dict(checkpoint: Path, tower: Path, config: LlavaConfig) -> tuple[dict[str, torch.Tensor], int]:
    """Both checkpoints' weights under LlavaForConditionalGeneration's names, checked against the
    model's keys and shapes. Returns (state dict, number of keys ignored as LLaVA ignores them)."""
    state: dict[str, torch.Tensor] = {}
    ignored = 0
    for folder, renames, skip in ((checkpoint, LLAVA_RENAMES, LLAVA_IGNORED), (tower, VISION_RENAMES, VISION_IGNORED)):
        for key, tensor in read_weights(weight_files(folder)).items():
            new = rename(key, renames, skip)
            if new is None:
                ignored += 1
            else:
                state[new] = tensor
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PruneEvalError(
            f"{checkpoint} + {tower} do not make a LLaVA-1.5 model: "
            + "; ".join(part for part in (
                f"{len(missing)} weight(s) missing, e.g. {', '.join(missing[:3])}" if missing else "",
                f"{len(unexpected)} unexpected weight(s), e.g. {', '.join(unexpected[:3])}" if unexpected else "") if part)
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items() if tuple(state[k].shape) != tuple(s)]
    if wrong:
        raise PruneEvalError(f"{checkpoint}: {len(wrong)} weight(s) have shapes the config does not give, e.g. {wrong[0]}")
    return state, ignored


def file_sha256(path: Path) -> str:
    """A file's sha256: the blob name for a Hugging Face cache file (LFS blobs are named by it), else computed."""
    real = path.resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    return sha256_file(real)


def weights_hash(files: list[Path]) -> dict[str, Any]:
    """sha256 over 'name size sha256' lines of the weight files, and the lines themselves."""
    rows = [{"file": f.name, "bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(files)]
    text = "".join(f"{r['file']} {r['bytes']} {r['sha256']}\n" for r in rows)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "files": rows}


# ----------------------------------------------------------------------------------------------
def load(model: ModelSpec, *, dtype: torch.dtype, device: torch.device, quantization_config=None) -> tuple[Any, Any, Any, dict]:
    """(model, tokenizer, image processor, info) for an original LLaVA checkpoint + its CLIP tower."""
    from transformers import LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    spec = ModelSpec.of(model)
    original, vision = check_available(spec)
    checkpoint, tower = locate(spec, "checkpoint"), locate(spec, "vision_tower")
    config = llava_config(original, vision)
    state, ignored = converted_state_dict(checkpoint.path, tower.path, config)
    model = LlavaForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state,
        dtype=dtype,
        device_map={"": str(device)} if quantization_config is not None else None,
        quantization_config=quantization_config,
        attn_implementation="sdpa",
    )
    del state
    if quantization_config is None:
        model = move_to_device(model, device)
    tokenizer = SentencePieceLlamaTokenizer.from_pretrained(checkpoint.path)
    image_processor = CLIPImageProcessorPil.from_pretrained(tower.path)
    info = {
        "layout": "original LLaVA (LlavaLlamaForCausalLM), renamed at load time",
        "commit": checkpoint.commit,
        "weights": weights_hash(weight_files(checkpoint.path)),
        "vision_tower": tower.where,
        "vision_tower_revision": spec.vision_tower_revision,
        "vision_tower_commit": tower.commit,
        "vision_weights": weights_hash(weight_files(tower.path)),
        "checkpoint_config": {k: original.get(k) for k in RECORDED_FIELDS},
        "ignored_keys": ignored,
        "tokenizer_legacy": tokenizer.legacy,
    }
    return model, tokenizer, image_processor, info
