"""Synthetic POPE: coloured shapes with yes/no object questions, so tests and the demo need no downloads.

It keeps POPE's structure, which is what the pipeline and the statistics depend on: every image is
asked 6 questions per split (3 about objects that are present, 3 about absent ones), the same images
appear in the three splits, and the splits differ only in how the absent objects are chosen:
`random` (any absent object), `popular` (the most frequent objects of the data set), `adversarial`
(absent objects that share a colour or a shape with a present one — the analogue of POPE's
co-occurring objects). Images are non-square so that `pad` and `crop` preprocessing differ: objects
near the long sides are cut by a centre crop.

Everything is a pure function of (seed, index): the same seed gives the same images and questions on
any machine, and `render_image` draws an image on demand instead of storing files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from prune_eval.data.pope import ANSWER_SUFFIX, SPLITS, Question

GENERATOR_VERSION = "1"
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
OBJECTS = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
QUESTIONS_PER_SPLIT = 3  # present and absent each: 6 per image per split, as in POPE


@dataclass(frozen=True)
class SceneObject:
    name: str  # "red circle"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1


@dataclass(frozen=True)
class Scene:
    name: str
    size: tuple[int, int]  # width, height
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]


def _rng(seed: int, index: int, purpose: str) -> np.random.Generator:
    """An independent stream per (seed, index, purpose): adding images never changes earlier ones."""
    digest = hashlib.sha256(f"pope-synthetic/{GENERATOR_VERSION}/{seed}/{index}/{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def image_name(seed: int, index: int) -> str:
    return f"synthetic_s{seed}_{index:05d}.png"


def make_scene(seed: int, index: int) -> Scene:
    """3-4 distinct, non-overlapping objects on a non-square canvas."""
    rng = _rng(seed, index, "scene")
    width, height = (int(rng.integers(392, 481)), int(rng.integers(280, 337)))
    if rng.random() < 0.5:  # portrait and landscape, as in COCO
        width, height = height, width
    background = tuple(int(v) for v in rng.integers(150, 216, size=3))
    names = rng.choice(len(OBJECTS), size=int(rng.integers(3, 5)), replace=False)
    objects: list[SceneObject] = []
    for name_index in names:
        for _ in range(200):
            side = int(rng.integers(60, 101))
            x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, o.box) for o in objects):
                objects.append(SceneObject(OBJECTS[name_index], box))
                break
    return Scene(image_name(seed, index), (width, height), background, tuple(objects))


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 6) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def render_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", scene.size, scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        color_name, shape = obj.name.split(" ")
        color = COLORS[color_name]
        x0, y0, x1, y1 = obj.box
        if shape == "circle":
            draw.ellipse(obj.box, fill=color)
        elif shape == "square":
            inset = (x1 - x0) // 8
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=color)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)
    return image


def render_image(seed: int, index: int) -> Image.Image:
    return render_scene(make_scene(seed, index))


def _absent_candidates(scene: Scene, split: str, popularity: list[str]) -> list[str]:
    present = {o.name for o in scene.objects}
    absent = [name for name in OBJECTS if name not in present]
    if split == "popular":
        return [name for name in popularity if name not in present]
    if split == "adversarial":
        colours = {n.split(" ")[0] for n in present}
        shapes = {n.split(" ")[1] for n in present}
        return [n for n in absent if n.split(" ")[0] in colours or n.split(" ")[1] in shapes]
    return absent


def make_questions(n_images: int, *, seed: int, splits: tuple[str, ...] = SPLITS, first_index: int = 0) -> list[Question]:
    """POPE-shaped questions for images `first_index .. first_index + n_images - 1`."""
    scenes = [make_scene(seed, i) for i in range(first_index, first_index + n_images)]
    frequency = {name: 0 for name in OBJECTS}
    for scene in scenes:
        for obj in scene.objects:
            frequency[obj.name] += 1
    popularity = sorted(OBJECTS, key=lambda n: (-frequency[n], OBJECTS.index(n)))
    questions: list[Question] = []
    for split in splits:
        qid = 0
        for position, scene in enumerate(scenes):
            rng = _rng(seed, first_index + position, f"questions/{split}")
            present = [o.name for o in scene.objects]
            yes = list(rng.choice(present, size=QUESTIONS_PER_SPLIT, replace=False))
            candidates = _absent_candidates(scene, split, popularity)
            if split == "popular":
                no = candidates[:QUESTIONS_PER_SPLIT]
            else:
                if len(candidates) < QUESTIONS_PER_SPLIT:  # too few look-alikes: top up at random
                    rest = [n for n in OBJECTS if n not in present and n not in candidates]
                    candidates += list(rng.permutation(rest)[: QUESTIONS_PER_SPLIT - len(candidates)])
                no = list(rng.choice(candidates, size=QUESTIONS_PER_SPLIT, replace=False))
            pairs = [(str(name), "yes") for name in yes] + [(str(name), "no") for name in no]
            for index in rng.permutation(len(pairs)):
                name, label = pairs[index]
                qid += 1
                text = f"Is there a {name} in the image?"
                questions.append(Question(split, qid, scene.name, text, label, text + ANSWER_SUFFIX))
    return questions


def parse_image_name(name: str) -> tuple[int, int]:
    """(seed, index) from a synthetic image name."""
    stem = name.removeprefix("synthetic_s").removesuffix(".png")
    seed, index = stem.split("_")
    return int(seed), int(index)
