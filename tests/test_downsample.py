"""Downsampling: the pooling against an independent loop over adaptive-average-pooling windows, the
features it pools (vision layer -2, CLS dropped, before the projector), square-budget errors, and
the fast path against the reference path on the tiny and the toy LLaVA."""

from __future__ import annotations

import re

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import answers_by_key, assert_same_answers

from prune_eval.config import CONF_DIR, plan_cell
from prune_eval.data import images, synthetic
from prune_eval.errors import PruneEvalError
from prune_eval.execution.engine import evaluate_reference, visual_tokens
from prune_eval.execution.fast import evaluate_fast
from prune_eval.methods import ModelGeometry, get_method
from prune_eval.methods.downsample import pool_patch_grid, resolve

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

LLAVA_7B = ModelGeometry(n_patches=576, vision_layers=24, vision_heads=16, text_layers=32, text_heads=32, text_hidden=4096, text_intermediate=11008)


def windows(n: int, out: int) -> list[range]:
    """Adaptive pooling's windows: output i covers inputs floor(i n / out) .. ceil((i + 1) n / out) - 1."""
    return [range(i * n // out, -(-(i + 1) * n // out)) for i in range(out)]


def ref_pool(patches: torch.Tensor, side: int) -> torch.Tensor:
    """patches (P, D), raster order of a square grid -> (side * side, D): plain float64 means."""
    grid = int(len(patches) ** 0.5)
    out = []
    for rows in windows(grid, side):
        for cols in windows(grid, side):
            members = [patches[r * grid + c].double() for r in rows for c in cols]
            out.append(sum(members) / len(members))
    return torch.stack(out)


def test_documented_windows_for_a_non_divisible_grid() -> None:
    """24 -> 14 (budget 196): the row/column windows the module docstring lists."""
    assert [(w.start, w.stop - 1) for w in windows(24, 14)] == [
        (0, 1), (1, 3), (3, 5), (5, 6), (6, 8), (8, 10), (10, 11), (12, 13), (13, 15), (15, 17), (17, 18), (18, 20), (20, 22), (22, 23)]
    assert [(w.start, w.stop - 1) for w in windows(24, 8)] == [(3 * i, 3 * i + 2) for i in range(8)]


@pytest.mark.parametrize("side", [1, 5, 8, 12, 14, 23, 24])
def test_pooling_matches_the_window_reference(side: int) -> None:
    g = torch.Generator().manual_seed(side)
    patches = torch.randn(2, 576, 6, generator=g)
    pooled = pool_patch_grid(patches, side)
    assert pooled.shape == (2, side * side, 6)
    for b in range(2):
        torch.testing.assert_close(pooled[b].double(), ref_pool(patches[b], side), atol=1e-6, rtol=1e-6)
    if side == 24:
        assert torch.equal(pooled, patches)


def test_pooled_tokens_keep_raster_order() -> None:
    """Features = (row, col) of each patch: the 8x8 output token t = (i, j) sits at the centre of
    its 3x3 block, row-major."""
    rows, cols = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    patches = torch.stack([rows.flatten(), cols.flatten()], dim=-1)[None]  # (1, 576, 2)
    pooled = pool_patch_grid(patches, 8)[0]
    expected = [[3 * i + 1.0, 3 * j + 1.0] for i in range(8) for j in range(8)]
    assert pooled.tolist() == expected


def test_pools_layer_minus_two_patches_before_the_projector(tiny_bundle) -> None:
    bundle = tiny_bundle
    method = get_method("downsample")
    params = method.resolve({}, 64, bundle.geometry)
    pixels = images.preprocess([synthetic.render_image(0, 3)], "pad", bundle.image_processor)
    ours = visual_tokens(bundle, method, params, pixels, [0])
    with torch.no_grad():
        hidden = bundle.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][0, 1:]  # (576, Dv)
        expected = bundle.projector(ref_pool(hidden, 8).float()[None])
    assert ours.shape == (1, 64, bundle.model.config.text_config.hidden_size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget, nearest", [(128, "121 (11x11) or 144 (12x12)"), (2, "1 (1x1) or 4 (2x2)"), (575, "529 (23x23) or 576 (24x24)")])
def test_budgets_that_are_not_square_name_the_nearest(budget: int, nearest: str) -> None:
    with pytest.raises(PruneEvalError, match=re.escape(f"budget={budget} is not; nearest allowed: {nearest}") + "$"):
        resolve({}, budget, LLAVA_7B)
    assert resolve({}, 144, LLAVA_7B) == {"visual_tokens": 144, "grid": [12, 12], "patch_grid": [24, 24], "pooling": "adaptive_avg_pool2d"}


def test_config_errors_are_one_line_before_anything_runs() -> None:
    for overrides, message in [(["method=downsample", "budget=128"], "nearest allowed: 121 (11x11) or 144 (12x12)"),
                               (["method=fastv", "budget=30", "method.budget_rule=layer_average"], "the budget must be in 193..576")]:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["experiment=demo", *overrides])
        with pytest.raises(PruneEvalError) as error:
            plan_cell(cfg)
        assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("model", ["tiny", "toy"])
def test_fast_path_gives_the_reference_answers(model, tiny_bundle, toy_bundle) -> None:
    bundle = tiny_bundle if model == "tiny" else toy_bundle
    questions = synthetic.make_questions(2, seed=4)
    reference = answers_by_key(evaluate_reference, bundle, "downsample", {}, 64, questions)
    assert reference.keys() == {q.key for q in questions}
    assert_same_answers(answers_by_key(evaluate_fast, bundle, "downsample", {}, 64, questions), reference)
