"""Typed, frozen descriptions of one cell: what the execution side is given instead of DictConfig nodes.

`prune_eval.config.plan_cell` validates a composed Hydra config once and returns a `CellSpec`; below
it (prune_eval.execution, models/, data/) code reads attributes of these dataclasses, never
`cfg.model.get("path")`. Each spec keeps only what its consumer needs, with the defaults the YAML
files document, so a key that is missing from a hand-written config means its default, not a crash
deep inside a job.

Torch-free at import (the quantization precision and the method's functions are referenced by
type only), so the sweep's planning and the analysis side can import it cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prune_eval.methods import Method, ModelGeometry
    from prune_eval.models.quant import Precision


def _plain(node: Any) -> Any:
    """A DictConfig/ListConfig (resolved) or any mapping/sequence as plain Python containers."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return node


def _optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


@dataclass(frozen=True)
class ModelSpec:
    """The `model` group: which checkpoint, from where, tokenized how (conf/model/*.yaml)."""

    name: str
    source: str  # hub | path (a local llava-hf folder) | tiny (built in code) | toy (shipped) | original (LLaVA's layout)
    id: str | None = None  # hub id (hub, original)
    path: str | None = None  # local folder; overrides id
    revision: str | None = None
    tokenization: str = "hf"  # hf | llava
    allow_download: bool = False
    init_seed: int = 0  # tiny: weight initialisation
    dims: Mapping[str, int] = field(default_factory=dict)  # tiny: sizes (prune_eval.models.tiny.build_config)
    vision_tower: str | None = None  # original: the CLIP tower's hub id
    vision_tower_path: str | None = None
    vision_tower_revision: str | None = None

    @classmethod
    def from_config(cls, node: Any) -> "ModelSpec":
        cfg = _plain(node) or {}
        declared = cfg.get("source")
        source = declared if declared in ("tiny", "toy", "original") else ("path" if cfg.get("path") else (declared or "hub"))
        return cls(
            name=str(cfg.get("name")),
            source=str(source),
            id=_optional_str(cfg.get("id")),
            path=_optional_str(cfg.get("path")),
            revision=_optional_str(cfg.get("revision")),
            tokenization=str(cfg.get("tokenization") or ("llava" if source == "original" else "hf")),
            allow_download=bool(cfg.get("allow_download", False)),
            init_seed=cfg.get("init_seed", 0),
            dims=dict(cfg.get("dims") or {}),
            vision_tower=_optional_str(cfg.get("vision_tower")),
            vision_tower_path=_optional_str(cfg.get("vision_tower_path")),
            vision_tower_revision=_optional_str(cfg.get("vision_tower_revision")),
        )

    @classmethod
    def of(cls, model: "ModelSpec | Any") -> "ModelSpec":
        """`model` itself, or the spec of a `model` config node (tests and benchmarks pass those)."""
        return model if isinstance(model, cls) else cls.from_config(model)


@dataclass(frozen=True)
class DataSpec:
    """The `data` group: which questions and images (conf/data/*.yaml)."""

    name: str  # pope | pope-synthetic
    version: str
    splits: tuple[str, ...] | None = None  # None: every split
    question_dir: str | None = None  # pope
    image_dir: str | None = None
    llava_question_file: str | None = None
    allow_unknown_version: bool = False
    n_images: int | None = None  # pope-synthetic
    seed: int | None = None

    @classmethod
    def from_config(cls, node: Any) -> "DataSpec":
        cfg = _plain(node) or {}
        splits = cfg.get("splits")
        return cls(
            name=str(cfg.get("name")),
            version=str(cfg.get("version")),
            splits=None if splits is None else (tuple(splits) if isinstance(splits, (list, tuple)) else splits),
            question_dir=_optional_str(cfg.get("question_dir")),
            image_dir=_optional_str(cfg.get("image_dir")),
            llava_question_file=_optional_str(cfg.get("llava_question_file")),
            allow_unknown_version=bool(cfg.get("allow_unknown_version", False)),
            n_images=cfg.get("n_images"),
            seed=cfg.get("seed"),
        )

    @classmethod
    def of(cls, data: "DataSpec | Any") -> "DataSpec":
        return data if isinstance(data, cls) else cls.from_config(data)


@dataclass(frozen=True)
class QuantSpec:
    """The `quant` group: the dtype and bitsandbytes settings (conf/quant/*.yaml), resolved."""

    name: str
    precision: "Precision"  # dtype + bitsandbytes config (prune_eval.models.quant)
    scope: str | None
    settings: Mapping[str, Any]  # the YAML's values, as recorded in the experiment


@dataclass(frozen=True)
class EvalSpec:
    """`eval.*`: how questions are answered; none of it changes what an answer should be."""

    fast: bool | str = "auto"  # True | False | "auto" (the fast path on CUDA, the reference path elsewhere)
    batch_size: int = 8
    batch_images: int = 64
    batch_tokens: int = 32768
    compile: bool = False
    max_new_tokens: int = 128
    stop_when_decided: bool = True
    part_size: int = 256
    shard_images: int = 64  # images per shard: the unit several workers may split a large cell by
    allow_mixed_numerics: bool = False  # a resumed cell may add parts computed under other runtime numerics (recorded)

    @classmethod
    def from_config(cls, node: Any) -> "EvalSpec":
        cfg = _plain(node) or {}
        defaults = cls()
        return cls(**{k: cfg.get(k, getattr(defaults, k)) for k in cls.__dataclass_fields__})

    def fast_on(self, device_type: str) -> bool:
        """Whether the fast path runs on a device of this type ('cuda', 'cpu', ...)."""
        return device_type == "cuda" if self.fast == "auto" else bool(self.fast)


@dataclass(frozen=True)
class MethodSpec:
    """The `method` group and `budget`, resolved by the method (prune_eval.methods)."""

    impl: "Method"  # the registered functions (selection, hook)
    params: Mapping[str, Any]  # effective parameters: they name the cell
    budget: int
    uses_seed: bool  # whether this method, with these parameters, draws random numbers

    @property
    def name(self) -> str:
        return self.impl.name

    @property
    def version(self) -> str:
        return self.impl.version


@dataclass(frozen=True)
class CellSpec:
    """One validated cell. `experiment` is everything that defines its result; `name` its directory."""

    name: str
    experiment: dict[str, Any]
    method: MethodSpec
    geometry: "ModelGeometry"
    model: ModelSpec
    quant: QuantSpec
    data: DataSpec
    preprocess: str
    eval: EvalSpec
    seed: int  # the requested run seed (torch's global seed in the cell); experiment["seed"] is None when unused
    device: str  # auto | cpu | cuda | cuda:N
    config: Mapping[str, Any] = field(default_factory=dict)  # the whole resolved config, for the summary

    @property
    def params(self) -> Mapping[str, Any]:
        return self.method.params

    @property
    def seed_free(self) -> bool:
        """The result cannot depend on the seed: one computation serves every seed."""
        return self.experiment.get("seed") is None

    @property
    def model_key(self) -> str:
        """What a loaded model depends on: checkpoint identity, quantization, device. Cells with the
        same key can share one loaded (and compiled) model; the image preprocessing does not change
        the weights, so it is not part of the key."""
        return json.dumps([self.experiment["model"], self.experiment["quant"], self.device], sort_keys=True, default=str)
