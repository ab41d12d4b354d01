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
from prune_eval.errors import PruneEvalError, unknown_choice
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
        if data.version != synthetic.GENERATOR_VERSION:
            raise PruneEvalError(f"data.version={data.version} for pope-synthetic; this code generates version {synthetic.GENERATOR_VERSION}")


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


def input_problems(data: DataSpec) -> list[str]:
    """One line per problem with the files this data config reads, each self-contained: missing
    question files (with the command that fetches them), question files that are not the configured
    POPE version or not valid, missing images (a count, an example path, the command that fetches
    them); [] when all is well or nothing is read (synthetic POPE).

    A sweep calls this once per distinct data config, before anything runs, so that everything
    missing is said at once. Images: the ones the question files ask about when those are readable,
    else POPE's 500 (the shipped list). Only their existence is checked here; the cell decodes them.
    """
    data = DataSpec.of(data)
    if data.name != "pope":
        return []
    try:
        splits = _splits(data)
    except PruneEvalError as e:
        return [str(e)]
    lines = []
    version = data.version
    question_dir = Path(str(data.question_dir)).expanduser()
    llava_file = data.llava_question_file
    if version not in pope.KNOWN_VERSIONS:
        lines.append(str(unknown_choice("POPE version (data.version)", version, pope.KNOWN_VERSIONS)))
    missing = pope.missing_files(question_dir, splits)
    if missing:
        out = "" if question_dir.resolve() == Path(f"data/pope/{version}").resolve() else f" --out {question_dir}"
        fetch = (f"fetch them with `python -m prune_eval.assets pope-questions --version {version}{out}` (POPE {version}), or "
                 if version in pope.KNOWN_VERSIONS else "")
        lines.append(f"missing POPE question file(s): {', '.join(missing)}; {fetch}set data.question_dir to a folder that has them")
    if llava_file and not Path(str(llava_file)).expanduser().is_file():
        lines.append(f"data.llava_question_file={llava_file} does not exist; it is LLaVA's llava_pope_test.jsonl "
                     f"(playground/data/eval/pope/ in haotian-liu/LLaVA), or set data.llava_question_file=null to use POPE's files")
    names = None
    if not lines:
        try:
            names = sorted({q.image for q in load_dataset(data).questions})
        except PruneEvalError as e:  # another POPE version, a malformed file, ...
            lines.append(str(e))
    if names is None:
        from prune_eval.assets.pope import NAMES_FILE

        names = sorted({line.strip() for line in NAMES_FILE.read_text().splitlines() if line.strip()})
    image_dir = Path(str(data.image_dir)).expanduser()
    absent = [n for n in names if not (image_dir / n).is_file()]
    if absent:
        out = "" if image_dir.resolve() == Path("data/coco/val2014").resolve() else f" --out {image_dir}"
        lines.append(f"{len(absent)} of {len(names)} POPE images missing in data.image_dir={image_dir}, e.g. "
                     f"{image_dir / absent[0]}; fetch them with `python -m prune_eval.assets pope-images{out}`")
    return lines



def load_dataset(data: DataSpec) -> Dataset:
    """The questions and images a DataSpec (or a `data` config node, converted) describes."""
    data = DataSpec.of(data)
    return DATASETS.get(data.name)(data)
