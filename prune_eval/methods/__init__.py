"""Pruning methods: one file per method, registered by name; the YAML in conf/method/ selects it.

A method is a plain record of functions (no class hierarchy):
- `resolve(params, budget, geometry)` validates the user's options against the model and returns the
  effective parameters. Everything that defines the method's output goes in there (it names the
  cell, so two configurations that resolve to the same parameters share one result), including
  `visual_tokens`, the number of visual tokens that enter the LLM.
- `select(vision, params, generator)` picks/merges image-level tokens before the projector
  (vanilla, VisionZip, random); it sees the vision tower's outputs, never the question.
- `make_hook(params, ...)` returns a `LayerHook` for pruning inside the LLM (SparseVLM, FastV), used by the
  reference path, one row per question.
- `make_pruner(params, bundle, prefix_len, n_visual)` returns a `QuestionPruner`
  (prune_eval.models.blocks) for the fast path: the questions of an image share everything up to
  its first pruning layer, then each keeps its own visual tokens; decisions are tensors over all
  questions of a batch. A question-dependent method without one runs one row per question there.
Token selection itself lives in pure tensor functions inside each method's file, apart from this
plumbing, so tests can check it against an independent reference.

Adding a method = one .py file in this package that calls `register(Method(...))` + one YAML file in
conf/method/ whose `name:` is the registry name. Modules here are imported automatically.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prune_eval.models.blocks import QuestionPruner
from prune_eval.models.llm import LayerHook
from prune_eval.models.vision import VisionOutputs
from prune_eval.registry import Registry


@dataclass(frozen=True)
class ModelGeometry:
    """What a method may need to know about the model to validate its options."""

    n_patches: int  # visual tokens LLaVA feeds the LLM without pruning (576 for 336/14)
    vision_layers: int
    vision_heads: int
    text_layers: int
    text_heads: int
    text_hidden: int
    text_intermediate: int

    @classmethod
    def from_config(cls, config) -> "ModelGeometry":
        """From a LlavaConfig alone, so validation needs no weights."""
        vision, text = config.vision_config, config.text_config
        return cls(
            n_patches=(vision.image_size // vision.patch_size) ** 2,
            vision_layers=vision.num_hidden_layers,
            vision_heads=vision.num_attention_heads,
            text_layers=text.num_hidden_layers,
            text_heads=text.num_attention_heads,
            text_hidden=text.hidden_size,
            text_intermediate=text.intermediate_size,
        )


@dataclass(frozen=True)
class Method:
    name: str
    version: str  # bump when the method's output changes; recorded with every result
    resolve: Callable[[dict[str, Any], int, ModelGeometry], dict[str, Any]]
    select: Callable[[VisionOutputs, dict[str, Any], torch.Generator | None], torch.Tensor] | None = None
    make_hook: Callable[..., LayerHook] | None = None
    make_pruner: Callable[..., QuestionPruner] | None = None
    needs_cls_attention: bool = False
    needs_keys: bool = False
    # its output depends on the run's seed: a bool, or a function of the resolved parameters (SparseVLM:
    # v1/v1.5 draw DPC-kNN noise, v2 draws nothing). False: one cell serves every seed of a sweep.
    uses_seed: bool | Callable[[dict[str, Any]], bool] = False
    text_dependent: bool = False  # its selection depends on the question

    def seed_matters(self, params: dict[str, Any]) -> bool:
        """Whether the output with these resolved parameters can depend on the seed."""
        return bool(self.uses_seed(params) if callable(self.uses_seed) else self.uses_seed)


# LLM layer indices published for LLaVA-1.5-7B's 32-layer Vicuna, mapped onto other LLMs (`method.layer_rule`)
OFFICIAL_LLM_LAYERS = 32
LAYER_RULES = ("auto", "official", "scaled")


def map_layers(layers: tuple[int, ...], n_layers: int, rule: str) -> tuple[str, tuple[int, ...]]:
    """The layer rule shared by SparseVLM and FastV: `official` keeps the published indices, `scaled`
    maps each to floor(l * n_layers / 32), `auto` is official where every index exists in an
    `n_layers`-layer LLM, else scaled. Returns (the rule applied, the layers); the caller checks that
    they are usable. Raises PruneEvalError for an unknown rule."""
    from prune_eval.errors import PruneEvalError

    if rule not in LAYER_RULES:
        raise PruneEvalError(f"method.layer_rule={rule}; choices: {', '.join(LAYER_RULES)}")
    if rule == "auto":
        rule = "official" if max(layers) < n_layers else "scaled"
    return rule, layers if rule == "official" else tuple(l * n_layers // OFFICIAL_LLM_LAYERS for l in layers)


METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    return METHODS.register(method.name)(method)


def get_method(name: str) -> Method:
    _import_all()
    return METHODS.get(name)


def method_names() -> list[str]:
    _import_all()
    return METHODS.names()


_imported = False


def _import_all() -> None:
    global _imported
    if not _imported:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _imported = True


def drop_cls(vision: VisionOutputs) -> torch.Tensor:
    """LLaVA's 'default' feature strategy: the patch tokens of the feature layer, CLS dropped."""
    return vision.hidden[:, 1:]  # (B, 1+P, Dv) -> (B, P, Dv)
