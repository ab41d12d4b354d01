"""model=llava-1.5-7b-original: LLaVA's own checkpoint layout, loaded by renaming at load time.

A tiny LLaVA (prune_eval.models.tiny's config, vocabulary = a sentencepiece model trained here) is
saved twice: in memory in the llava-hf layout (the reference) and on disk in the original layout —
LlavaLlamaForCausalLM keys in two .bin shards with an index, a flat config.json with mm_* fields, a
separate CLIP checkpoint (full CLIPModel keys, openai's old preprocessor_config.json), tokenizer.model.
The original-layout folder must load through the real `model=llava-1.5-7b-original` config and give
the reference's logits exactly, and tokenize LLaVA's POPE prompt as LLaVA's code does.
"""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece as spm
import torch
from conftest import POPE, run_cli
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from prune_eval.config import CONF_DIR, plan_cell
from prune_eval.data import images, synthetic
from prune_eval.execution.engine import EvalSettings, generate_rows, tokenized_prompts, visual_tokens
from prune_eval.errors import PruneEvalError
from prune_eval.methods import get_method
from prune_eval.models import loading, original, tiny
from prune_eval.models.prompt import SYSTEM_VICUNA_V1, tokenize_prompts, vicuna_v1_prompt
from prune_eval.models.sentencepiece_llama import SentencePieceLlamaTokenizer

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

IMAGE_TOKEN_INDEX = -200  # llava/constants.py
QUESTION = "Is there a dog in the image?\nAnswer the question using a single word or phrase."
SETTINGS = EvalSettings(batch_size=2, max_new_tokens=3, stop_when_decided=False, fast=False)


# ----------------------------------------------------------------------------------------------
# Building the two layouts
def train_sentencepiece() -> bytes:
    """A small BPE model with LLaMA's normalizer settings (dummy prefix, no whitespace folding, byte
    fallback, unk/bos/eos = 0/1/2, no pad)."""
    lines = [SYSTEM_VICUNA_V1, "USER: ASSISTANT: Yes No yes no Yes, there is. No, there is not."]
    with open(POPE / "llava-1.5" / "coco_pope_adversarial.json") as f:
        lines += [json.loads(line)["text"] + " Answer the question using a single word or phrase." for line in f.readlines()[:400]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    return model.getvalue()


def hf_to_original(key: str) -> str | None:
    """The inverse of the renaming under test, written out independently; None: not in the checkpoint."""
    for new, old in (("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                     ("model.language_model.", "model."), ("lm_head.", "lm_head.")):
        if key.startswith(new):
            return old + key[len(new):]
    return None


def original_config(config) -> dict:
    """config.json as liuhaotian/llava-v1.5-7b writes it (LLaVA's train.py), with the tiny shapes."""
    text = config.text_config
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": 4096, "rms_norm_eps": text.rms_norm_eps, "rope_scaling": None, "tie_word_embeddings": False,
        "vocab_size": text.vocab_size, "torch_dtype": "float16", "use_cache": True, "pretraining_tp": 1,
        "image_aspect_ratio": "pad", "mm_hidden_size": config.vision_config.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_patch_merge_type": "flat",
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False, "use_mm_proj": True,
    }


# openai/clip-vit-large-patch14-336's preprocessor_config.json (the old format: size and crop_size as ints)
OPENAI_PREPROCESSOR = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
}


def write_original(root, hf_model, sp_model: bytes, *, legacy: bool = False):
    """(checkpoint folder, vision tower folder) in the original layout."""
    from transformers import CLIPConfig

    checkpoint, tower = root / "llava-v1.5-tiny", root / "clip-tiny"
    checkpoint.mkdir()
    tower.mkdir()
    state = hf_model.state_dict()
    llava = {hf_to_original(k): v.clone() for k, v in state.items() if hf_to_original(k)}
    llava["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old transformers saved this buffer
    llava["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.zeros(3)  # LLaVA ignores it
    keys = sorted(llava)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, shard in shards.items():
        torch.save({k: llava[k] for k in shard}, checkpoint / name)
    weight_map = {k: name for name, shard in shards.items() for k in shard}
    (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (checkpoint / "config.json").write_text(json.dumps(original_config(hf_model.config)))
    (checkpoint / "tokenizer.model").write_bytes(sp_model)
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": {"__type": "AddedToken", "content": "<s>"},
        "eos_token": {"__type": "AddedToken", "content": "</s>"}, "unk_token": {"__type": "AddedToken", "content": "<unk>"},
        "pad_token": "<unk>", "legacy": legacy, "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer",
        "model_max_length": 2048, "padding_side": "right"}))
    vision = hf_model.config.vision_config
    CLIPConfig(vision_config=vision.to_dict(), text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                           "num_attention_heads": 2, "vocab_size": 50,
                                                           "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}).save_pretrained(tower)
    clip = {"vision_model." + k[len("model.vision_tower."):]: v.clone() for k, v in state.items() if k.startswith("model.vision_tower.")}
    clip.update({"text_model.embeddings.token_embedding.weight": torch.randn(50, 16), "visual_projection.weight": torch.randn(8, vision.hidden_size),
                 "text_projection.weight": torch.randn(8, 16), "logit_scale": torch.tensor(2.6592)})
    save_file(clip, str(tower / "model.safetensors"))
    (tower / "preprocessor_config.json").write_text(json.dumps(OPENAI_PREPROCESSOR))
    return checkpoint, tower


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    sp_model = train_sentencepiece()
    config = tiny.build_config()
    config.text_config.vocab_size = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()
    config.text_config.pad_token_id = 0
    hf_model = tiny.build_model(config, init_seed=3)
    checkpoint, tower = write_original(tmp_path_factory.mktemp("original"), hf_model, sp_model)
    return hf_model, checkpoint, tower


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["model=llava-1.5-7b-original", "data=pope-synthetic", "device=cpu",
                                                        "quant=fp32", *overrides])


def original_cfg(checkpoint, tower, *overrides: str):
    return compose_model(f"model.path={checkpoint}", f"model.vision_tower_path={tower}", *overrides)


@pytest.fixture(scope="module")
def loaded(layouts):
    _, checkpoint, tower = layouts
    cfg = original_cfg(checkpoint, tower)
    loading.check_available(cfg.model)
    return loading.load(cfg.model, dtype=torch.float32, device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Same weights, same logits
def test_original_layout_has_the_llava_hf_weights_and_logits(layouts, loaded) -> None:
    hf_model, _, _ = layouts
    model = loaded.model
    reference = hf_model.state_dict()
    assert set(model.state_dict()) == set(reference)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    pixels = torch.randn(1, 3, 336, 336)
    ids = torch.tensor([[1, 20, 30, 40]])
    logits = []
    for m in (model, hf_model):
        with torch.no_grad():
            features = m.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default",
                                                  return_dict=True).pooler_output
            text = m.model.get_input_embeddings()(ids)
            embeds = torch.cat([text[:, :2], torch.stack(list(features)), text[:, 2:]], dim=1)
            logits.append(m(inputs_embeds=embeds).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_answers_through_the_evaluation_loop_are_identical(layouts, loaded) -> None:
    hf_model, _, _ = layouts
    reference = loading.make_bundle(hf_model, loaded.tokenizer, loaded.image_processor, dtype=torch.float32,
                                    device=torch.device("cpu"), tokenization="llava")
    questions = synthetic.make_questions(1, seed=0)[:2]
    outputs = []
    for bundle in (loaded, reference):
        spec = get_method("vanilla")
        params = spec.resolve({}, 576, bundle.geometry)
        pixels = images.preprocess([synthetic.render_image(0, 0)] * 2, "pad", bundle.image_processor)
        visual = visual_tokens(bundle, spec, params, pixels, [0, 0])
        tokenized = tokenized_prompts(bundle, questions)
        outputs.append(generate_rows(bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS))
    for ours, theirs in zip(*outputs):
        assert ours.token_ids == theirs.token_ids
        torch.testing.assert_close(ours.first_logits, theirs.first_logits, rtol=0, atol=0)


def test_summary_records_checkpoint_tower_config_and_weights_hash(layouts, loaded) -> None:
    _, checkpoint, tower = layouts
    info = loaded.info
    assert info["source"] == "original" and info["checkpoint"] == str(checkpoint) and info["vision_tower"] == str(tower)
    assert info["tokenization"] == "llava" and info["tokenizer"] == "SentencePieceLlamaTokenizer" and info["tokenizer_legacy"] is False
    assert info["checkpoint_config"]["mm_vision_select_layer"] == -2 and info["checkpoint_config"]["image_aspect_ratio"] == "pad"
    assert [f["file"] for f in info["weights"]["files"]] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert info["weights"]["files"][0]["sha256"] == original.sha256_file(checkpoint / "pytorch_model-00001-of-00002.bin")
    assert len(info["weights"]["sha256"]) == 64 and len(info["vision_weights"]["sha256"]) == 64
    assert info["ignored_keys"] == 2 + 4  # inv_freq + the saved tower copy; CLIP's text tower, projections, logit scale
    assert loaded.feature_layer == -2 and loaded.image_token_id == loaded.model.config.text_config.vocab_size
    assert loaded.image_processor.crop_size == {"height": 336, "width": 336} and loaded.image_processor.size == {"shortest_edge": 336}


def test_weights_hash_of_a_hub_cache_file_is_its_blob_name(tmp_path) -> None:
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"not hashed")
    link = tmp_path / "snapshots" / ("c" * 40) / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert original.file_sha256(link) == "ab" * 32


def test_cell_identity_names_both_checkpoints(layouts) -> None:
    _, checkpoint, tower = layouts
    spec = plan_cell(original_cfg(checkpoint, tower))
    model = spec.experiment["model"]
    assert model == {"name": "llava-1.5-7b-original", "source": "original", "tokenization": "llava", "checkpoint": str(checkpoint),
                     "revision": None, "vision_tower": str(tower), "vision_tower_revision": None, "tokenizer": "sentencepiece-slow"}
    assert spec.geometry.n_patches == 576 and spec.name.startswith("vanilla-576_anyseed_llava-1.5-7b-original-fp32-pad")


# ----------------------------------------------------------------------------------------------
# Tokenization: LLaVA's conversation template and tokenizer_image_token, written out independently
def llava_conversation_prompt(question: str) -> str:
    """conv_vicuna_v1.get_prompt() (llava/conversation.py, SeparatorStyle.TWO) for one user turn and an
    empty assistant turn, with model_vqa_loader's qs = '<image>\\n' + question."""
    system, roles, seps = SYSTEM_VICUNA_V1, ("USER", "ASSISTANT"), (" ", "</s>")
    messages = [(roles[0], "<image>\n" + question), (roles[1], None)]
    prompt = system + seps[0]
    for i, (role, message) in enumerate(messages):
        prompt += role + ": " + message + seps[i % 2] if message else role + ":"
    return prompt


def llava_input_ids(prompt: str, sp, bos: int) -> list[int]:
    """llava/mm_utils.py tokenizer_image_token: each chunk tokenized with BOS, the image index between
    them, every chunk after the first without its first token."""
    chunks = [[bos] + sp.encode(chunk) for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += chunk[1:]
    return ids


def test_pope_prompt_is_llavas_conversation_prompt() -> None:
    prompt = llava_conversation_prompt(QUESTION)
    assert prompt == vicuna_v1_prompt(QUESTION)
    assert prompt.endswith("phrase. ASSISTANT:") and "</s>" not in prompt  # sep2 only follows an assistant answer
    assert " USER: <image>\nIs there a dog" in prompt


@pytest.mark.parametrize("legacy", [True, False])
def test_pope_prompt_token_ids_match_tokenizer_image_token(layouts, tmp_path, legacy) -> None:
    _, checkpoint, _ = layouts
    (tmp_path / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy, "pad_token": "<unk>"}))
    tokenizer = SentencePieceLlamaTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    tokenized = tokenize_prompts([QUESTION], tokenizer, mode="llava", image_token_id=-1)
    ours = [*tokenized.prefix, IMAGE_TOKEN_INDEX, *tokenized.suffixes[0]]
    assert ours == llava_input_ids(vicuna_v1_prompt(QUESTION), sp, bos=1)
    pieces = [sp.id_to_piece(i) for i in tokenized.prefix[-3:]] + ["<image>"] + [sp.id_to_piece(i) for i in tokenized.suffixes[0][:3]]
    # as LLaVA-1.5's ids ... 29901 (':'), 29871 ('▁'), -200, 29871 ('▁'), 13 ('<0x0A>'), ...: a space token on each side
    assert pieces[1:6] == [":", "▁", "<image>", "▁", "<0x0A>"]
    assert tokenized.prefix[0] == 1 and tokenized.suffixes[0][-2:] == tuple(sp.encode(" ASSISTANT:")[-2:])


def test_legacy_flag_changes_only_text_after_special_tokens(layouts) -> None:
    """transformers 4.37's slow LlamaTokenizer: legacy=True lets the dummy prefix act after '</s>'."""
    _, checkpoint, _ = layouts
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    legacy = SentencePieceLlamaTokenizer(checkpoint / "tokenizer.model", legacy=True)
    modern = SentencePieceLlamaTokenizer(checkpoint / "tokenizer.model", legacy=False)
    assert legacy.encode("Yes</s>there") == [1, *sp.encode("Yes"), 2, *sp.encode("there")]
    after = modern.tokenize("Yes</s>there")[modern.tokenize("Yes</s>there").index("</s>") + 1:]
    assert "".join(after) == "there" and modern.encode("Yes</s>there")[:-len(after)] == [1, *sp.encode("Yes"), 2]  # no "▁"
    assert modern.encode(" two  spaces") == legacy.encode(" two  spaces") == [1, *sp.encode(" two  spaces")]
    for tokenizer in (legacy, modern):
        assert tokenizer.decode(tokenizer.encode("Yes, there is a dog."), skip_special_tokens=True) == "Yes, there is a dog."
        assert tokenizer.eos_token_id == 2 and len(tokenizer) == sp.get_piece_size()


# ----------------------------------------------------------------------------------------------
# Bad input
def test_hf_tokenization_is_refused(layouts) -> None:
    _, checkpoint, tower = layouts
    with pytest.raises(PruneEvalError, match="only LLaVA's own tokenization works: model.tokenization=llava"):
        loading.check_available(original_cfg(checkpoint, tower, "model.tokenization=hf").model)


def test_llava_hf_folder_given_as_original_and_vice_versa(layouts, tiny_bundle, tmp_path) -> None:
    _, checkpoint, tower = layouts
    tiny_bundle.model.save_pretrained(tmp_path / "hf")
    with pytest.raises(PruneEvalError, match="holds a checkpoint in the llava-hf layout; use model=llava-1.5-7b"):
        loading.check_available(original_cfg(tmp_path / "hf", tower).model)
    hub_cfg = compose_model("model=llava-1.5-7b", f"model.path={checkpoint}")
    with pytest.raises(PruneEvalError, match="holds an original LLaVA checkpoint .* use model=llava-1.5-7b-original"):
        loading.check_available(hub_cfg.model)


def test_not_a_llava_checkpoint_and_not_a_clip_tower(layouts, tmp_path) -> None:
    _, checkpoint, tower = layouts
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PruneEvalError, match="holds a 'bert' checkpoint; expected an original LLaVA checkpoint"):
        loading.check_available(original_cfg(tmp_path, tower).model)
    with pytest.raises(PruneEvalError, match="vision_tower_path=.* holds a 'bert' checkpoint; expected a CLIP model"):
        loading.check_available(original_cfg(checkpoint, tmp_path).model)


def test_missing_projector_weights_are_named(layouts, tmp_path) -> None:
    _, checkpoint, tower = layouts
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    index = json.loads((broken / "pytorch_model.bin.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        state = torch.load(broken / shard, weights_only=True)
        torch.save({k: v for k, v in state.items() if "mm_projector.2" not in k}, broken / shard)
    with pytest.raises(PruneEvalError, match="2 weight\\(s\\) missing, e.g. model.multi_modal_projector.linear_2.bias"):
        loading.load(original_cfg(broken, tower).model, dtype=torch.float32, device=torch.device("cpu"))


def test_unsupported_llava_variant_is_refused(layouts, tmp_path) -> None:
    _, checkpoint, tower = layouts
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(PruneEvalError, match="mm_projector_type='linear' is not supported"):
        loading.check_available(original_cfg(tmp_path, tower).model)


@pytest.mark.slow  # a CLI subprocess: ~7 s, more on a busy machine
def test_uncached_original_is_one_line_before_anything_runs(tmp_path) -> None:
    result = run_cli(["model=llava-1.5-7b-original", "data=pope-synthetic", "device=cpu"], tmp_path,
                     env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "weights for liuhaotian/llava-v1.5-7b are not in the Hugging Face cache" in lines[0]
    assert "python -m prune_eval.assets weights --model llava-1.5-7b-original" in lines[0]
