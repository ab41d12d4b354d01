"""Our decoder loop against transformers' own LLaVA forward/generate on the tiny model (fp32)."""

from __future__ import annotations

import builtins

import pytest
import torch
from conftest import tiny_model_cfg

from prune_eval.data import images, synthetic
from prune_eval.execution.engine import EvalSettings, generate_rows, tokenized_prompts, visual_tokens
from prune_eval.methods import get_method
from prune_eval.models import loading
from prune_eval.models import llm
from prune_eval.models.llm import KVCache, LayerHook, TokenMeta, forward_layers
from prune_eval.models.prompt import tokenize_prompts, vicuna_v1_prompt
from prune_eval.models.vision import encode_images

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

SETTINGS = EvalSettings(batch_size=4, max_new_tokens=6, stop_when_decided=False, fast=False)


def hf_inputs(bundle, question_prompt: str, pixel_values: torch.Tensor) -> dict:
    text = vicuna_v1_prompt(question_prompt).replace("<image>", "<image>" * bundle.geometry.n_patches)
    return {"input_ids": bundle.tokenizer(text, return_tensors="pt").input_ids, "pixel_values": pixel_values}


@pytest.fixture(scope="module")
def gqa_bundle():
    """A tiny model with grouped-query attention (2 KV heads for 4 query heads)."""
    return loading.load(tiny_model_cfg(text_kv_heads=2), dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("which", ["tiny_bundle", "gqa_bundle"])
def test_greedy_answers_equal_hf_generate(which, request) -> None:
    bundle = request.getfixturevalue(which)
    questions = synthetic.make_questions(2, seed=0)[:3]
    pixel_values = images.preprocess([synthetic.render_image(0, 0)] * 3, "pad", bundle.image_processor)
    vanilla = get_method("vanilla")
    visual = visual_tokens(bundle, vanilla, {}, pixel_values, [0, 0, 0])
    tokenized = tokenized_prompts(bundle, questions)
    ours = generate_rows(bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS)
    for q, generation, pixels in zip(questions, ours, pixel_values):
        inputs = hf_inputs(bundle, q.prompt, pixels[None])
        with torch.no_grad():
            reference = bundle.model.generate(**inputs, max_new_tokens=SETTINGS.max_new_tokens, do_sample=False)
            logits = bundle.model(**inputs).logits[0, -1]
        new_tokens = reference[0, inputs["input_ids"].shape[1]:].tolist()
        expected = new_tokens[: new_tokens.index(bundle.tokenizer.eos_token_id)] if bundle.tokenizer.eos_token_id in new_tokens else new_tokens
        assert generation.token_ids == expected
        torch.testing.assert_close(generation.first_logits, logits, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_one_by_one(tiny_bundle) -> None:
    """Questions of different lengths in one left-padded batch answer as they do alone."""
    bundle = tiny_bundle
    questions = synthetic.make_questions(3, seed=5)
    prompts = [questions[0].prompt, "Is there a cat ?" + "\nAnswer the question using a single word or phrase.", questions[1].prompt + " in the image in the image"]
    tokenized = tokenize_prompts(prompts, bundle.tokenizer, mode="hf", image_token_id=bundle.image_token_id)
    assert len({len(s) for s in tokenized.suffixes}) == 3
    pixel_values = images.preprocess([synthetic.render_image(5, i) for i in range(3)], "crop", bundle.image_processor)
    visual = visual_tokens(bundle, get_method("vanilla"), {}, pixel_values, [0, 0, 0])
    batched = generate_rows(bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS)
    for b in range(3):
        alone = generate_rows(bundle, tokenized.prefix, visual[b : b + 1], tokenized.suffixes[b : b + 1], SETTINGS)[0]
        assert batched[b].token_ids == alone.token_ids
        torch.testing.assert_close(batched[b].first_logits, alone.first_logits, atol=1e-5, rtol=1e-5)


def test_vision_tower_stops_at_the_feature_layer(tiny_bundle) -> None:
    bundle = tiny_bundle
    pixel_values = images.preprocess([synthetic.render_image(0, 1)], "pad", bundle.image_processor)
    ours = encode_images(bundle.vision_tower, pixel_values, feature_layer=-2)
    with torch.no_grad():
        theirs = bundle.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours.hidden, theirs, atol=1e-6, rtol=1e-6)


def test_prompt_split_around_the_image(tiny_bundle) -> None:
    bundle = tiny_bundle
    question = synthetic.make_questions(1, seed=0)[0]
    full = bundle.tokenizer(vicuna_v1_prompt(question.prompt)).input_ids
    for mode in ("hf", "llava"):
        tokenized = tokenize_prompts([question.prompt], bundle.tokenizer, mode=mode, image_token_id=bundle.image_token_id)
        assert list(tokenized.prefix) + [bundle.image_token_id] + list(tokenized.suffixes[0]) == full
        assert tokenized.prefix[0] == bundle.tokenizer.bos_token_id


def test_decoder_loop_passes_the_cache_under_the_installed_name_without_a_warning(tiny_bundle) -> None:
    """transformers 5.24 renamed the layers' `past_key_values` to `cache` (and warns on the old name);
    5.17 knows only the old one. Either way: no deprecation warning, and the cache is filled (a name
    the layer does not know would vanish into **kwargs and leave it empty)."""
    import inspect
    import warnings

    from prune_eval.models.llm import KVCache

    layer_parameters = inspect.signature(type(tiny_bundle.lm.layers[0]).forward).parameters
    assert tiny_bundle.lm.cache_kwarg in layer_parameters
    assert tiny_bundle.lm.cache_kwarg == ("cache" if "cache" in layer_parameters else "past_key_values")
    questions = synthetic.make_questions(1, seed=0)[:2]
    pixel_values = images.preprocess([synthetic.render_image(0, 0)] * 2, "pad", tiny_bundle.image_processor)
    visual = visual_tokens(tiny_bundle, get_method("vanilla"), {}, pixel_values, [0, 0])
    tokenized = tokenized_prompts(tiny_bundle, questions)
    filled: list[list[int]] = []
    original_update = KVCache.update

    def watched_update(self, key, value, layer_idx, *args, **kwargs):
        result = original_update(self, key, value, layer_idx, *args, **kwargs)
        filled.append(self.lengths())
        return result

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning/DeprecationWarning from any layer call fails the test
        KVCache.update = watched_update
        try:
            generate_rows(tiny_bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS)
        finally:
            KVCache.update = original_update
    assert filled and all(n > 0 for n in filled[-1]), "the decoder layers never wrote the KV cache"


class DropLastToken(LayerHook):
    """Prunes the last token after each of `layers`, with a new TokenMeta every time."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = layers

    def after(self, layer_idx, hidden, positions, meta, cache):
        if layer_idx not in self.layers:
            return None
        return hidden[:, :-1], positions[:, :-1], TokenMeta(meta.slot[:, :-1].clone(), meta.segment[:, :-1].clone())


def test_every_layer_gets_the_mask_of_its_own_tokens_after_repeated_pruning(tiny_bundle, monkeypatch) -> None:
    """forward_layers builds one mask per distinct (keys, queries) pair of TokenMeta objects. Keyed by
    id() alone, a TokenMeta freed after one pruning could pass its id to the next one and fetch a
    stale mask of another shape (a torch.compile shape error on the GPU, found by
    benchmarks/resident_sweep.py). Many prunings, each a fresh TokenMeta: every layer call must get a
    (B, 1, Q, K) mask for its own queries and the keys it attends to."""
    lm = tiny_bundle.lm
    n_layers, width, batch, prefix, text = lm.n_layers, lm.embed_tokens.embedding_dim, 2, 5, lm.n_layers + 4
    seen: list[tuple[tuple[int, ...], tuple[int, ...] | None, int]] = []
    for i, layer in enumerate(lm.layers):
        def checked(hidden, *args, _layer=layer, _i=i, attention_mask=None, **kwargs):
            cache = kwargs[lm.cache_kwarg]
            seen.append((tuple(hidden.shape[:2]), None if attention_mask is None else tuple(attention_mask.shape), cache.length[_i]))
            return _layer(hidden, *args, attention_mask=attention_mask, **kwargs)
        monkeypatch.setitem(lm.layers._modules, str(i), checked)
    # CPython hands a dead object's id to a new one; which object gets it depends on the allocator.
    # The worst case, forced: every TokenMeta has the same id (a lookup by id() would return the first
    # mask it built for every later layer).
    monkeypatch.setattr(llm, "id", lambda obj: 0 if isinstance(obj, TokenMeta) else builtins.id(obj), raising=False)
    generator = torch.Generator().manual_seed(0)
    for trial in range(3):
        cache = KVCache(n_layers)
        meta = TokenMeta(torch.arange(prefix).expand(batch, -1), torch.zeros(batch, prefix, dtype=torch.long))
        forward_layers(lm, torch.randn(batch, prefix, width, generator=generator), meta.slot.clone(), meta, cache, decoding=False)
        slots = torch.arange(prefix, prefix + text).expand(batch, -1)
        questions = TokenMeta(slots.clone(), torch.ones(batch, text, dtype=torch.long))
        seen.clear()
        with torch.no_grad():
            forward_layers(lm, torch.randn(batch, text, width, generator=generator), slots.clone(), questions, cache,
                           decoding=False, hook=DropLastToken(tuple(range(n_layers))))
        assert [(hidden, mask) for hidden, mask, _ in seen] == [((batch, text - i), (batch, 1, text - i, prefix + text - i))
                                                                for i in range(n_layers)], trial
