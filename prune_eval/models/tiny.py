"""A tiny LLaVA built from configs in code, with an offline word-level tokenizer.

It has the real input geometry (336 px images, 14 px patches -> 576 visual tokens plus CLS, LLaVA's
prompt template) so every pruning method runs on it unchanged, but dimensions small enough for CPU
tests. Weights are random (seeded by `init_seed`, independent of the run's seed) unless a trained
checkpoint such as `model=toy` is loaded instead.

Facts: ../shared/notes/hf-llava.md ("Tiny offline LLaVA for tests").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from prune_eval.data.synthetic import COLORS, SHAPES

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TEMPLATE_WORDS = (
    "A chat between a curious user and an artificial intelligence assistant . The assistant gives "
    "helpful , detailed , and polite answers to the user ' s questions . USER : ASSISTANT : "
    "Answer the question using a single word or phrase . Is there in image ?"
).split()
ANSWER_WORDS = ["Yes", "No", "yes", "no", "not", "I", "see", "it", "is", "are", "this", "that", "object"]
# POPE's COCO object words, so real question files tokenise to something other than <unk>.
COCO_WORDS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign "
    "parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard "
    "surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot dog pizza donut cake chair couch potted plant bed dining table toilet tv "
    "laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase "
    "scissors teddy hair drier toothbrush imange"
).split()


def vocabulary() -> list[str]:
    """Special tokens first (fixed ids 0-4), then every word once, in a fixed order."""
    words = list(SPECIAL_TOKENS)
    for word in TEMPLATE_WORDS + ANSWER_WORDS + list(COLORS) + list(SHAPES) + COCO_WORDS:
        if word not in words:
            words.append(word)
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: words and punctuation are tokens; BOS is prepended like Llama's."""
    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing at 336 px, as llava-hf/llava-1.5-7b-hf's preprocessor_config.json."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        resample=3,
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def build_config(
    *,
    vision_hidden: int = 64,
    vision_layers: int = 4,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 8,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    intermediate_factor: int = 2,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP 336/14 vision tower, 2-layer GELU projector, Llama LLM."""
    vocab = vocabulary()
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * intermediate_factor,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=336,
        patch_size=14,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * intermediate_factor,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads or text_heads,
        max_position_embeddings=4096,
        bos_token_id=vocab.index("<s>"),
        eos_token_id=vocab.index("</s>"),
        pad_token_id=vocab.index("<pad>"),
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab.index("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def llava15_shapes(*, text_layers: int = 32, vision_layers: int = 24) -> LlavaConfig:
    """LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336, 2-layer GELU projector, Vicuna-7B) with this
    module's vocabulary ids, for random-weight benchmarks: real FLOPs, no download."""
    config = build_config(vision_hidden=1024, vision_layers=vision_layers, vision_heads=16, text_hidden=4096,
                          text_layers=text_layers, text_heads=32, intermediate_factor=4)
    config.text_config.intermediate_size = 11008
    config.text_config.vocab_size = 32064
    config.text_config.max_position_embeddings = 4096
    return config


def build_model(config: LlavaConfig, *, init_seed: int = 0) -> LlavaForConditionalGeneration:
    """Random weights, deterministic given `init_seed` (and independent of the global RNG state)."""
    from transformers import LlavaForConditionalGeneration

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(init_seed)
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()
