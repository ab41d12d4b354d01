"""POPE's question files and its 500 COCO val2014 images, downloaded and verified.

Question files come from AoiDragon/POPE at the pinned commits (`output/coco/coco_pope_<split>.json`) and
must match the sha256 of their version in prune_eval.data.pope.KNOWN_VERSIONS.

Images come one by one from COCO's image server (`http://images.cocodataset.org/val2014/<name>`):
exactly the 500 that POPE asks about (coco_val2014_pope.txt beside this file, the union of the image
names of both POPE versions; or the names in the question files given with --questions). Every image is
checked for a non-empty size, that PIL decodes it fully as a JPEG, and — when a checksum list exists —
its sha256. The checksum list (coco_val2014_pope.sha256, `sha256sum` format, so `sha256sum -c` also
works inside the image folder) must be generated once, on a machine that can reach COCO, with
`--write-checksums`, and then shipped: it is absent until someone does that, and until then only size
and decodability are checked (the command says so).

The base addresses can be moved (a mirror, or a local server in tests): `--base-url` or the
environment variables PRUNE_EVAL_COCO_URL and PRUNE_EVAL_POPE_URL.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from prune_eval.assets import download
from prune_eval.assets.download import CORRUPT, DOWNLOADED, FAILED, MISSING, PRESENT, Outcome
from prune_eval.data.pope import KNOWN_VERSIONS, SPLITS, pope_file
from prune_eval.errors import PruneEvalError
from prune_eval.execution.records import sha256_file

COCO_URL = "http://images.cocodataset.org/val2014"
COCO_ZIP = "http://images.cocodataset.org/zips/val2014.zip"
POPE_URL = "https://raw.githubusercontent.com/AoiDragon/POPE"
POPE_REPO = "https://github.com/AoiDragon/POPE"
POPE_COMMITS = {"llava-1.5": "e3e39262c85a6a83f26cf5094022a782cb0df58d", "latest": "08d957b917e5a378a2f99d35b6293c536a66298b"}
NAMES_FILE = Path(__file__).with_name("coco_val2014_pope.txt")
CHECKSUMS_FILE = Path(__file__).with_name("coco_val2014_pope.sha256")


def coco_url(base_url: str | None = None) -> str:
    return (base_url or os.environ.get("PRUNE_EVAL_COCO_URL") or COCO_URL).rstrip("/")


def pope_url(base_url: str | None = None) -> str:
    return (base_url or os.environ.get("PRUNE_EVAL_POPE_URL") or POPE_URL).rstrip("/")


# ----------------------------------------------------------------------------------------------
# Which images, which checksums
def image_names(question_dir: Path | None = None) -> list[str]:
    """The POPE images: the shipped list, or the images the coco_pope_<split>.json in question_dir ask about."""
    if question_dir is None:
        return [line.strip() for line in NAMES_FILE.read_text().splitlines() if line.strip()]
    files = [pope_file(Path(question_dir), s) for s in SPLITS if pope_file(Path(question_dir), s).is_file()]
    if not files:
        raise PruneEvalError(f"no coco_pope_<split>.json in {question_dir}; fetch them with `python -m prune_eval.assets pope-questions`")
    names = set()
    for file in files:
        names |= {json.loads(line)["image"] for line in file.read_text().splitlines() if line.strip()}
    return sorted(names)


def read_checksums(path: Path) -> dict[str, str]:
    """{name: sha256} from a sha256sum-format file; {} when the file is absent or empty."""
    if not Path(path).is_file():
        return {}
    checksums = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise PruneEvalError(f"{path}:{number}: expected '<sha256>  <file name>' (sha256sum format), got {line[:80]!r}")
        checksums[name.strip()] = digest.lower()
    return checksums


def write_checksums(path: Path, folder: Path, names: Iterable[str]) -> Path:
    lines = "".join(f"{sha256_file(Path(folder) / name)}  {name}\n" for name in sorted(names))
    Path(path).write_text(lines)
    return Path(path)


def image_problem(path: Path, expected_sha256: str | None = None) -> str | None:
    """Why the file at path is not a good POPE image, or None: empty, not a fully decodable JPEG, wrong sha256."""
    from PIL import Image

    size = path.stat().st_size
    if size == 0:
        return "empty file"
    try:
        with Image.open(path) as image:
            image_format = image.format
            image.load()  # decodes every pixel: a truncated JPEG fails here
    except Exception as e:  # PIL raises several types for bad data
        return f"not a decodable image ({type(e).__name__}: {str(e)[:80]})"
    if image_format != "JPEG":
        return f"a {image_format} image, not a JPEG"
    if expected_sha256 is not None:
        digest = sha256_file(path)
        if digest != expected_sha256:
            return f"sha256 {digest[:12]}…, expected {expected_sha256[:12]}… ({size} bytes)"
    return None


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageReport:
    folder: Path
    outcomes: tuple[Outcome, ...]
    checksums: int  # how many images had a known sha256

    def of(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def ok(self) -> bool:
        return all(o.status in (PRESENT, DOWNLOADED) for o in self.outcomes)

    def lines(self) -> list[str]:
        counts = ", ".join(f"{len(self.of(s))} {s}" for s in (PRESENT, DOWNLOADED, MISSING, CORRUPT, FAILED) if self.of(s))
        out = [f"{len(self.outcomes)} POPE images in {self.folder}: {counts or 'none'}"]
        out += [f"  {o.status}: {o.name}: {o.detail}" for o in self.outcomes if o.status in (MISSING, CORRUPT, FAILED)]
        out.append(f"checked: size, full JPEG decode, sha256 of {self.checksums}" if self.checksums else
                   f"checked: size and full JPEG decode (no checksum list: {CHECKSUMS_FILE.name} is generated once with --write-checksums)")
        return out


def _existing(folder: Path, name: str, checksums: dict[str, str]) -> Outcome | None:
    """PRESENT for a good file already there; an invalid one is moved aside to NAME.invalid."""
    path = folder / name
    if not path.is_file():
        return None
    problem = image_problem(path, checksums.get(name))
    if problem is None:
        return Outcome(name, PRESENT)
    os.replace(path, path.with_name(name + ".invalid"))
    return None


def no_network_error(base: str, detail: str, folder: Path, missing: int) -> PruneEvalError:
    return PruneEvalError(
        f"cannot reach {base} ({detail}); {missing} POPE image(s) not downloaded. Download them by hand: the COCO "
        f"val2014 zip {COCO_ZIP} (6.2 GB; keep the files listed in {NAMES_FILE}) or each file from {base}/<name>; put "
        f"them in {folder} and run `python -m prune_eval.assets pope-images --out {folder} --check` to verify them"
    )


def fetch_images(names: list[str], folder: Path, *, base_url: str | None = None, checksums: dict[str, str] | None = None,
                 jobs: int = 8, retries: int = 3, timeout: float = 30.0, backoff: float = 0.5, progress: bool = True) -> ImageReport:
    """Download the images not yet in `folder` (parallel, resumable, verified); report every image."""
    from tqdm import tqdm

    folder, checksums, base = Path(folder), checksums or {}, coco_url(base_url)
    folder.mkdir(parents=True, exist_ok=True)
    outcomes = {name: _existing(folder, name, checksums) for name in names}
    todo = [name for name, outcome in outcomes.items() if outcome is None]

    def get(name: str) -> Outcome:
        return download.fetch(f"{base}/{name}", folder / name, check=lambda p: image_problem(p, checksums.get(name)),
                              timeout=timeout, retries=retries, backoff=backoff)

    if not todo:
        return ImageReport(folder, tuple(outcomes[n] for n in names), sum(n in checksums for n in names))
    first = get(todo[0])  # alone: an unreachable server is one clear error, not 500 failures
    if first.unreachable:
        raise no_network_error(base, first.detail, folder, len(todo))
    outcomes[todo[0]] = first
    with tqdm(total=len(todo), initial=1, desc="POPE images", unit="img", disable=None if progress else True) as bar:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(get, name): name for name in todo[1:]}
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                bar.update()
    return ImageReport(folder, tuple(outcomes[n] for n in names), sum(n in checksums for n in names))


def check_images(names: list[str], folder: Path, *, checksums: dict[str, str] | None = None) -> ImageReport:
    """Verify the images in `folder` without downloading (missing ones are reported as missing)."""
    checksums = checksums or {}
    outcomes = []
    for name in names:
        path = Path(folder) / name
        problem = image_problem(path, checksums.get(name)) if path.is_file() else None
        status = MISSING if not path.is_file() else CORRUPT if problem else PRESENT
        outcomes.append(Outcome(name, status, "not in the folder" if status == MISSING else problem or ""))
    return ImageReport(Path(folder), tuple(outcomes), sum(n in checksums for n in names))


# ----------------------------------------------------------------------------------------------
def question_urls(version: str, base_url: str | None = None) -> dict[str, str]:
    if version not in POPE_COMMITS:
        raise PruneEvalError(f"unknown POPE version '{version}'; choices: {', '.join(POPE_COMMITS)}")
    return {s: f"{pope_url(base_url)}/{POPE_COMMITS[version]}/output/coco/coco_pope_{s}.json" for s in SPLITS}


def fetch_questions(version: str, folder: Path, *, base_url: str | None = None, retries: int = 3, timeout: float = 30.0,
                    backoff: float = 0.5) -> list[Outcome]:
    """POPE's three question files of `version` into `folder`, each checked against its known sha256."""
    urls, folder = question_urls(version, base_url), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def problem(path: Path, split: str) -> str | None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        expected = KNOWN_VERSIONS[version][split]
        return None if digest == expected else f"sha256 {digest[:12]}…, expected {expected[:12]}… (POPE {version} at {POPE_COMMITS[version][:7]})"

    outcomes = []
    for split, url in urls.items():
        dest = pope_file(folder, split)
        if dest.is_file() and problem(dest, split) is None:
            outcomes.append(Outcome(dest.name, PRESENT))
            continue
        if dest.is_file():
            os.replace(dest, dest.with_name(dest.name + ".invalid"))
        outcome = download.fetch(url, dest, check=lambda p, s=split: problem(p, s), timeout=timeout, retries=retries, backoff=backoff)
        if outcome.unreachable:
            raise PruneEvalError(
                f"cannot reach {pope_url(base_url)} ({outcome.detail}); download by hand {', '.join(urls.values())} into "
                f"{folder} (or `git clone {POPE_REPO}`, `git checkout {POPE_COMMITS[version]}` and copy output/coco/coco_pope_*.json)"
            )
        outcomes.append(outcome)
    return outcomes
