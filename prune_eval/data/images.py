"""Images and the two preprocessing conventions that LLaVA evaluations disagree on.

- `pad` is LLaVA-1.5's `image_aspect_ratio: pad`: expand2square with the CLIP mean colour, then the
  CLIP processor (resize shortest edge to 336, centre crop 336 — a no-op on a square).
- `crop` is the llava-hf processor's default: resize shortest edge to 336 and centre crop, which cuts
  the sides of non-square images (transformers PR #33191 added `do_pad`, default False).

The processor itself is `CLIPImageProcessorPil` built from the checkpoint's preprocessor config, so the
resize is PIL's bicubic as in LLaVA's pinned transformers 4.37 rather than torchvision's; which class
did the work is recorded in every cell summary.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prune_eval.data import synthetic
from prune_eval.errors import PruneEvalError
from prune_eval.registry import Registry

ImageLoader = Callable[[str], Image.Image]
# The `preprocess` config group: what happens to an RGB image before the CLIP processor.
PREPROCESSORS: Registry[Callable[[Image.Image, object], Image.Image]] = Registry("preprocess")


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: paste the image centred on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The background LLaVA pads with: int(255 * CLIP mean) per channel."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


@PREPROCESSORS.register("pad")
def pad_to_square(image: Image.Image, image_processor) -> Image.Image:
    return expand2square(image, mean_colour(image_processor))


@PREPROCESSORS.register("crop")
def leave_for_centre_crop(image: Image.Image, image_processor) -> Image.Image:
    return image  # the processor's resize + centre crop does the rest


# half the cores, at most 8: the rest is left to torch and to the pipeline around it; 1 on a 2-core machine
IMAGE_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


def load_and_preprocess(names: Sequence[str], load_image: ImageLoader, mode: str, image_processor) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values of the named images, decoded and preprocessed in
    IMAGE_THREADS threads, one image each (JPEG decoding, PIL's resize and numpy's arithmetic release
    the GIL). Equal to `preprocess([load_image(n) for n in names], ...)`: the processor works image by
    image. Why: on one thread the images were a third of a VisionZip@64 POPE cell's time on an H200
    (12.9 s for the cell, 8.6 s with the threads; BENCHMARKS.md, resident workers). Raises what `load_image`
    raises (PruneEvalError for a missing or undecodable file)."""
    if IMAGE_THREADS == 1 or len(names) < 2:
        return preprocess([load_image(n) for n in names], mode, image_processor)
    one = lambda name: preprocess([load_image(name)], mode, image_processor)  # noqa: E731
    return torch.cat(list(_image_threads(IMAGE_THREADS).map(one, names)))


@functools.cache
def _image_threads(n: int) -> ThreadPoolExecutor:
    """One pool per process (and thread count), made on first use."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="prune-eval-images")


def preprocess(images: Sequence[Image.Image], mode: str, image_processor) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values under the given preprocessing convention."""
    prepare = PREPROCESSORS.get(mode)
    images = [prepare(image.convert("RGB"), image_processor) for image in images]
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)


def directory_loader(image_dir: Path) -> ImageLoader:
    image_dir = Path(image_dir)

    def load(name: str) -> Image.Image:
        path = image_dir / name
        try:
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
        except FileNotFoundError:
            raise PruneEvalError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise PruneEvalError(f"image {path} cannot be decoded ({e}); re-download it") from None
        except Exception as e:  # PIL's decoders also raise SyntaxError, ValueError, DecompressionBombError, ... on bad files
            raise PruneEvalError(f"image {path} cannot be decoded ({type(e).__name__}: {e}); re-download it") from None

    return load


def synthetic_loader() -> ImageLoader:
    def load(name: str) -> Image.Image:
        seed, index = synthetic.parse_image_name(name)
        return synthetic.render_image(seed, index)

    return load
