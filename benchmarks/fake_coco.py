"""Stand-in JPEGs under the names POPE references, for timing runs where COCO is not available.

    python benchmarks/fake_coco.py --questions ../shared/data/pope/llava-1.5 --out /tmp/coco
The pictures are synthetic (coloured shapes, 640x480 like COCO); the work per image is the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from PIL import Image

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prune_eval.data import synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = sorted({json.loads(line)["image"] for f in args.questions.glob("coco_pope_*.json") for line in f.read_text().splitlines() if line.strip()})
    for name in names:
        index = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 100_000
        synthetic.render_image(11, index).resize((640, 480), Image.BICUBIC).save(args.out / name, quality=90)
    print(f"{len(names)} images in {args.out}")


if __name__ == "__main__":
    main()
