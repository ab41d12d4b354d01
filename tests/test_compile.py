"""eval.compile: every decoder layer runs compiled, from graphs compiled once for all layers.

Before LanguageModel.compiled() made `layer_idx` a graph input, dynamo compiled each layer anew
(it guarded on the int attribute) and past torch._dynamo.config.recompile_limit (8) ran the
remaining layers eagerly: "hit config.recompile_limit (8)". Here a counting backend records every
graph dynamo hands over and every time one runs; the tiny model's 8 layers must all run through
compiled graphs that are shared by the layers (fewer graphs than layers, each run by all of them;
layer 0 may have its own for the first kinds of call). The answers must equal the uncompiled model's.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from prune_eval.data import images
from prune_eval.data.synthetic import make_questions
from prune_eval.execution import engine, fast
from prune_eval.execution.engine import EvalSettings
from prune_eval.methods import get_method

pytestmark = pytest.mark.slow


class CountingBackend:
    """A torch.compile backend that runs each graph as traced (eager ops) and counts its runs."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.runs: Counter = Counter()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        index = len(self.graphs)
        self.graphs.append(gm)

        def run(*args):
            self.runs[index] += 1
            return gm.forward(*args)

        return run

    def runs_of(self, module_name: str) -> int:
        """Runs of the graphs that use a parameter of `module_name` (e.g. input_layernorm)."""
        return sum(n for i, n in self.runs.items() if module_name in self.graphs[i].code)

    def graphs_of(self, module_name: str) -> int:
        return sum(module_name in g.code for g in self.graphs)


def shared_by_the_layers(runs: list[int], n_layers: int) -> bool:
    """Whether graph run counts are those of graphs shared by the layers: each graph runs for every
    layer of its calls (a multiple of n_layers), or, for the first kinds of call dynamo meets, one
    graph runs for layer 0 (c runs: dynamo compiles the first value it sees as a constant) and one
    for the other layers ((n_layers - 1) c runs). Per-layer graphs would run c times each."""
    rest = sorted(runs)
    while rest:
        c = rest.pop(0)
        if (n_layers - 1) * c in rest:
            rest.remove((n_layers - 1) * c)
        elif c % n_layers:
            return False
    return True


def answer(bundle, questions, *, fast_path: bool) -> list:
    settings = EvalSettings(batch_size=4, max_new_tokens=2, stop_when_decided=False, fast=fast_path)
    out: list = []
    (fast.evaluate_fast if fast_path else engine.evaluate_reference)(
        bundle, get_method("vanilla"), {"visual_tokens": 576}, questions, images.synthetic_loader(), preprocess="pad",
        settings=settings, seed=0, on_answers=out.extend)
    return [(a.question.key, a.generation.token_ids) for a in out]


@pytest.mark.timeout(600)
def test_every_layer_runs_compiled_from_graphs_shared_by_all_layers(tiny_bundle, monkeypatch, caplog) -> None:
    import dataclasses

    torch._dynamo.reset()
    questions = make_questions(2, seed=0, splits=("random",))
    expected = {path: answer(tiny_bundle, questions, fast_path=path) for path in (True, False)}

    backend = CountingBackend()
    bundle = dataclasses.replace(tiny_bundle, lm=tiny_bundle.lm.compiled(backend=backend))
    layer_calls = Counter()
    for module in (engine, fast):
        real = module.run_layers

        def counted(lm, *args, _real=real, **kwargs):
            layer_calls["layers"] += lm.n_layers
            return _real(lm, *args, **kwargs)

        monkeypatch.setattr(module, "run_layers", counted)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        got = {path: answer(bundle, questions, fast_path=path) for path in (True, False)}
    try:
        assert got == expected  # compiled = eager, token for token
        n_layers = bundle.lm.n_layers
        assert n_layers == 8 and layer_calls["layers"] >= 4 * n_layers
        # each layer call runs one graph before the KV-cache update and one after it: all compiled
        assert backend.runs_of("input_layernorm") == layer_calls["layers"], (backend.runs_of("input_layernorm"), layer_calls)
        assert backend.runs_of("post_attention_layernorm") == layer_calls["layers"]
        # graphs per kind of call (prefill with or without a mask, decoding, ...), run by all layers in turn
        first_halves = {i: n for i, n in backend.runs.items() if "input_layernorm" in backend.graphs[i].code}
        assert len(first_halves) < n_layers and shared_by_the_layers(list(first_halves.values()), n_layers), first_halves
        assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
        unimplemented = torch._dynamo.utils.counters["unimplemented"]
        assert not [k for k in unimplemented if "recompile" in k.lower()], list(unimplemented)
        print(f"\ncompile: {layer_calls['layers']} layer calls of {n_layers} layers, all through compiled graphs; "
              f"{len(backend.graphs)} graphs compiled ({backend.graphs_of('input_layernorm')} with a layer's first half)")
    finally:
        torch._dynamo.reset()
