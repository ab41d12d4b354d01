"""Data sets: the `data` config group's registry. Each entry turns its config into a `Dataset`.

Image handling (and with it torch) is imported inside the loaders, so that reading question files
(prune_eval.data.pope, the ingest command, the report) stays torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prune_eval.data import pope, synthetic
from prune_eval.data.pope import Question
from prune_eval.errors import PruneEvalError
from prune_eval.registry import Registry


@dataclass
class Dataset:
    questions: list[Question]
    load_image: Callable  # image name -> PIL image
    provenance: dict  # version, checksums, counts: recorded in every cell summary
    check_images: Callable[[], None]  # raises PruneEvalError naming missing images


DATASETS: Registry[Callable[..., Dataset]] = Registry("data")


def _splits(data_cfg) -> tuple[str, ...]:
    value = data_cfg.get("splits")
    if value is None:
        return pope.SPLITS
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise PruneEvalError(f"data.splits={value}; must be a list, e.g. data.splits=[random] or data.splits=[random,popular]")
    splits = tuple(value)
    bad = [s for s in splits if s not in pope.SPLITS]
    if bad or not splits:
        raise PruneEvalError(f"unknown POPE split(s) {', '.join(map(str, bad)) or '(none given)'}; allowed: {', '.join(pope.SPLITS)}")
    twice = sorted({s for s in splits if splits.count(s) > 1})
    if twice:
        raise PruneEvalError(f"data.splits={list(splits)} names {', '.join(twice)} twice; each split once")
    return splits


def _whole_number(data_cfg, key: str, minimum: int) -> int:
    value = data_cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PruneEvalError(f"data.{key}={value}; must be a whole number >= {minimum}")
    return value


def check_data_options(data_cfg) -> None:
    """The options every data set shares, and the synthetic one's numbers, before anything is read."""
    _splits(data_cfg)
    if str(data_cfg.get("name")) == "pope-synthetic":
        _whole_number(data_cfg, "n_images", 1)
        _whole_number(data_cfg, "seed", 0)


@DATASETS.register("pope")
def load_pope(data_cfg) -> Dataset:
    image_dir = Path(data_cfg.image_dir).expanduser().resolve()
    llava_file = data_cfg.get("llava_question_file")
    questions, provenance = pope.load_pope(
        Path(data_cfg.question_dir).expanduser().resolve(),
        version=str(data_cfg.version),
        splits=_splits(data_cfg),
        llava_question_file=Path(llava_file).expanduser().resolve() if llava_file else None,
        allow_unknown_version=bool(data_cfg.get("allow_unknown_version", False)),
    )
    provenance["image_dir"] = str(image_dir)
    from prune_eval.data import images

    return Dataset(questions, images.directory_loader(image_dir), provenance, lambda: pope.check_images(image_dir, questions))


@DATASETS.register("pope-synthetic")
def load_synthetic(data_cfg) -> Dataset:
    check_data_options(data_cfg)
    n_images = data_cfg.n_images
    if str(data_cfg.version) != synthetic.GENERATOR_VERSION:
        raise PruneEvalError(f"data.version={data_cfg.version} for pope-synthetic; this code generates version {synthetic.GENERATOR_VERSION}")
    splits = _splits(data_cfg)
    questions = synthetic.make_questions(n_images, seed=int(data_cfg.seed), splits=splits)
    provenance = {
        "format": "synthetic",
        "version": synthetic.GENERATOR_VERSION,
        "n_images": n_images,
        "seed": int(data_cfg.seed),
        "counts": {s: sum(q.split == s for q in questions) for s in splits},
    }
    from prune_eval.data import images

    return Dataset(questions, images.synthetic_loader(), provenance, lambda: None)


def load_dataset(data_cfg) -> Dataset:
    return DATASETS.get(str(data_cfg.name))(data_cfg)
