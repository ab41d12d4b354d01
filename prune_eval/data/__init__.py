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
from prune_eval.specs import DataSpec


@dataclass
class Dataset:
    questions: list[Question]
    load_image: Callable  # image name -> PIL image
    provenance: dict  # version, checksums, counts: recorded in every cell summary
    check_images: Callable[[], None]  # raises PruneEvalError naming missing images


DATASETS: Registry[Callable[..., Dataset]] = Registry("data")


def _splits(data: DataSpec) -> tuple[str, ...]:
    value = data.splits
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


def _whole_number(data: DataSpec, key: str, minimum: int) -> int:
    value = getattr(data, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PruneEvalError(f"data.{key}={value}; must be a whole number >= {minimum}")
    return value


def check_data_options(data: DataSpec) -> None:
    """The options every data set shares, and the synthetic one's numbers, before anything is read.
    `data`: a DataSpec (or a `data` config node, converted)."""
    data = DataSpec.of(data)
    _splits(data)
    if data.name == "pope-synthetic":
        _whole_number(data, "n_images", 1)
        _whole_number(data, "seed", 0)


@DATASETS.register("pope")
def load_pope(data: DataSpec) -> Dataset:
    image_dir = Path(str(data.image_dir)).expanduser().resolve()
    llava_file = data.llava_question_file
    questions, provenance = pope.load_pope(
        Path(str(data.question_dir)).expanduser().resolve(),
        version=data.version,
        splits=_splits(data),
        llava_question_file=Path(llava_file).expanduser().resolve() if llava_file else None,
        allow_unknown_version=data.allow_unknown_version,
    )
    provenance["image_dir"] = str(image_dir)
    from prune_eval.data import images

    return Dataset(questions, images.directory_loader(image_dir), provenance, lambda: pope.check_images(image_dir, questions))


@DATASETS.register("pope-synthetic")
def load_synthetic(data: DataSpec) -> Dataset:
    check_data_options(data)
    n_images = data.n_images
    if data.version != synthetic.GENERATOR_VERSION:
        raise PruneEvalError(f"data.version={data.version} for pope-synthetic; this code generates version {synthetic.GENERATOR_VERSION}")
    splits = _splits(data)
    questions = synthetic.make_questions(n_images, seed=int(data.seed), splits=splits)
    provenance = {
        "format": "synthetic",
        "version": synthetic.GENERATOR_VERSION,
        "n_images": n_images,
        "seed": int(data.seed),
        "counts": {s: sum(q.split == s for q in questions) for s in splits},
    }
    from prune_eval.data import images

    return Dataset(questions, images.synthetic_loader(), provenance, lambda: None)


def load_dataset(data: DataSpec) -> Dataset:
    """The questions and images a DataSpec (or a `data` config node, converted) describes."""
    data = DataSpec.of(data)
    return DATASETS.get(data.name)(data)
