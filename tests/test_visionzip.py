"""VisionZip: the pure functions against an independent loop reference of the published algorithm,
the plumbing on the tiny LLaVA, and the random baseline."""

from __future__ import annotations

import pytest
import torch

from prune_eval.data import images, synthetic
from prune_eval.execution.engine import visual_tokens
from prune_eval.errors import PruneEvalError
from prune_eval.methods import ModelGeometry, get_method
from prune_eval.methods.random_tokens import random_indices
from prune_eval.methods.visionzip import PUBLISHED_SPLITS, resolve, visionzip_tokens
from prune_eval.models.vision import VisionOutputs, encode_images

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

GEOMETRY = ModelGeometry(n_patches=576, vision_layers=24, vision_heads=16, text_layers=32, text_heads=32, text_hidden=4096, text_intermediate=11008)


def reference_one_image(attention: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int):
    """The published algorithm for one image, written as plain loops (fp32 scalar arithmetic).

    attention (H, N): CLS row of layer -2; keys (N, dk): head-averaged keys; hidden (N, D).
    Returns (kept token indices, output features (dominant + contextual, D)).
    """
    n_heads, n_tokens = attention.shape
    scores = {}
    for j in range(1, n_tokens):
        total = attention[0, j].clone()
        for h in range(1, n_heads):
            total = total + attention[h, j]
        scores[j] = float(total)
    best = sorted(scores, key=lambda j: (-scores[j], j))[: dominant - 1]
    kept = sorted([0, *best])
    remaining = [j for j in range(n_tokens) if j not in kept]
    step = max(1, len(remaining) // contextual)
    targets = list(range(0, len(remaining), step))[:contextual]
    unit = {j: keys[j].double() / sum(float(v) ** 2 for v in keys[j]) ** 0.5 for j in remaining}
    members: dict[int, list[int]] = {t: [] for t in targets}
    for position, j in enumerate(remaining):
        if position in targets:
            continue
        similarities = [float((unit[j].double() * unit[remaining[t]].double()).sum()) for t in targets]
        members[targets[similarities.index(max(similarities))]].append(j)
    merged = []
    for t in targets:
        total = torch.zeros(hidden.shape[1], dtype=torch.float32)
        for j in members[t]:
            total = total + hidden[j]
        merged.append(hidden[remaining[t]] + total / max(1, len(members[t])))
    features = torch.stack([hidden[j] for j in kept] + merged)
    return kept, features


def random_vision_outputs(batch: int, seed: int) -> VisionOutputs:
    """Real CLIP-L/336 shapes: 577 tokens, 16 heads, 1024-d hidden, 64-d keys."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.randn(batch, 16, 577, generator=g).mul(3).softmax(-1)
    return VisionOutputs(hidden=torch.randn(batch, 577, 1024, generator=g), cls_attention=attention, keys=torch.randn(batch, 577, 64, generator=g))


@pytest.mark.parametrize("budget", sorted(PUBLISHED_SPLITS))
def test_pure_functions_match_the_loop_reference_bit_exactly(budget: int) -> None:
    dominant, contextual = PUBLISHED_SPLITS[budget]
    vision = random_vision_outputs(2, seed=budget)
    features = visionzip_tokens(vision, dominant, contextual)
    assert features.shape == (2, budget, 1024)
    from prune_eval.methods.visionzip import dominant_indices

    kept = dominant_indices(vision.cls_attention, dominant)
    for b in range(2):
        expected_kept, expected = reference_one_image(vision.cls_attention[b], vision.keys[b], vision.hidden[b], dominant, contextual)
        assert kept[b].tolist() == expected_kept
        assert expected_kept[0] == 0  # CLS is kept
        assert torch.equal(features[b], expected), f"max diff {(features[b] - expected).abs().max()}"


def test_target_plus_mean_not_mean_including_target() -> None:
    """A hand-made case: one target, two members -> target + mean(members)."""
    hidden = torch.zeros(1, 6, 2)
    hidden[0, :, 0] = torch.tensor([9.0, 1.0, 2.0, 4.0, 8.0, 16.0])
    attention = torch.zeros(1, 1, 6)
    attention[0, 0, 1] = 1.0  # patch 1 dominant
    keys = torch.ones(1, 6, 3)
    out = visionzip_tokens(VisionOutputs(hidden, attention, keys), dominant=2, contextual=1)
    # kept [0, 1]; remaining [2, 3, 4, 5]; target = 2; members 3, 4, 5
    assert out[0, :, 0].tolist() == pytest.approx([9.0, 1.0, 2.0 + (4 + 8 + 16) / 3])
    assert out[0, 2, 0] != pytest.approx((2 + 4 + 8 + 16) / 4)  # not a mean that includes the target


@pytest.mark.parametrize(
    "params, budget, message",
    [
        ({"dominant": 60, "contextual": 10}, 64, "60 \\+ 10 = 70, but budget=64"),
        ({"dominant": 0, "contextual": 64}, 64, "method.dominant=0; must be at least 1"),
        ({"dominant": None, "contextual": -2}, 64, "method.contextual=-2"),
        ({"dominant": 570, "contextual": 10}, 580, "need more than the 577 vision tokens"),
    ],
)
def test_bad_splits_are_rejected(params, budget, message) -> None:
    with pytest.raises(PruneEvalError, match=message):
        resolve(params, budget, GEOMETRY)


def test_budget_splits() -> None:
    assert resolve({}, 64, GEOMETRY)["dominant"] == 54 and resolve({}, 192, GEOMETRY)["contextual"] == 30
    derived = resolve({}, 32, GEOMETRY)
    assert (derived["dominant"], derived["contextual"]) == (27, 5) and derived["split_rule"].startswith("derived")
    assert resolve({"contextual": 0}, 64, GEOMETRY)["dominant"] == 64


def test_hooked_cls_attention_and_keys_equal_eager(tiny_bundle) -> None:
    tower = tiny_bundle.vision_tower
    pixels = images.preprocess([synthetic.render_image(0, i) for i in range(2)], "pad", tiny_bundle.image_processor)
    ours = encode_images(tower, pixels, feature_layer=-2, need_cls_attention=True, need_keys=True)
    layer = tower.encoder.layers[-2].self_attn
    captured = {}
    handle = layer.k_proj.register_forward_hook(lambda module, args, out: captured.setdefault("k", out))
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = "sdpa"
        handle.remove()
    torch.testing.assert_close(ours.cls_attention, eager.attentions[-2][:, :, 0], atol=1e-6, rtol=1e-5)
    heads = layer.num_heads
    expected_keys = captured["k"].view(2, 577, heads, -1).mean(2)
    torch.testing.assert_close(ours.keys, expected_keys, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.hidden, eager.hidden_states[-2])


@pytest.mark.parametrize("method, budget", [("visionzip", 64), ("visionzip", 128), ("random", 16), ("vanilla", 64)])
def test_visual_tokens_entering_the_llm(tiny_bundle, method, budget) -> None:
    spec = get_method(method)
    params = spec.resolve({}, budget, tiny_bundle.geometry)
    pixels = images.preprocess([synthetic.render_image(0, 0)], "pad", tiny_bundle.image_processor)
    visual = visual_tokens(tiny_bundle, spec, params, pixels, [7])
    assert visual.shape[1] == (576 if method == "vanilla" else budget)


def test_random_draw_depends_on_seed_only() -> None:
    a = random_indices(576, 64, [1, 2])
    assert torch.equal(a, random_indices(576, 64, [1, 2]))
    assert not torch.equal(a[0], a[1])
    assert a.shape == (2, 64) and bool((a[:, 1:] > a[:, :-1]).all())
