"""`python -m prune_eval.assets COMMAND`: fetch POPE's question files, its images, or a model's weights.

    python -m prune_eval.assets pope-questions [--version llava-1.5|latest] [--out data/pope/VERSION]
    python -m prune_eval.assets pope-images [--out data/coco/val2014] [--jobs 8] [--check] [--write-checksums]
    python -m prune_eval.assets weights --model llava-1.5-7b|llava-1.5-7b-original|...

Defaults match conf/data/pope.yaml (question_dir data/pope/${data.version}, image_dir data/coco/val2014).
User errors (an unknown model, no network) print one line and exit 2; images that could not be
fetched are listed and exit 1 (rerun the same command: finished files are skipped, partial ones resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prune_eval.errors import PruneEvalError, unknown_choice

MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"  # the `model` config group (prune_eval.config.CONF_DIR)


def _pope_questions(args) -> int:
    from prune_eval.assets import pope

    out = Path(args.out or f"data/pope/{args.version}")
    outcomes = pope.fetch_questions(args.version, out, base_url=args.base_url, retries=args.retries, timeout=args.timeout)
    for o in outcomes:
        print(f"{o.status}: {out / o.name}" + (f" ({o.detail})" if o.detail else ""))
    bad = [o for o in outcomes if o.status not in (pope.PRESENT, pope.DOWNLOADED)]
    if bad:
        raise PruneEvalError(f"{len(bad)} POPE question file(s) not fetched: " + "; ".join(f"{o.name}: {o.detail}" for o in bad))
    print(f"POPE {args.version} question files verified in {out} (data.question_dir={out} data.version={args.version})")
    return 0


def _pope_images(args) -> int:
    from prune_eval.assets import pope

    out = Path(args.out)
    names = pope.image_names(Path(args.questions) if args.questions else None)
    checksums = pope.read_checksums(Path(args.checksums))
    if args.check:
        report = pope.check_images(names, out, checksums=checksums)
    else:
        report = pope.fetch_images(names, out, base_url=args.base_url, checksums=checksums, jobs=args.jobs,
                                   retries=args.retries, timeout=args.timeout, progress=not args.quiet)
    print("\n".join(report.lines()))
    if not report.ok:
        bad = len(report.outcomes) - len(report.of(pope.PRESENT)) - len(report.of(pope.DOWNLOADED))
        print(f"{bad} image(s) not in place; rerun the command (finished files are skipped, partial ones resume) or put "
              f"them in {out} by hand from {pope.coco_url(args.base_url)}/<name>", file=sys.stderr)
        return 1
    if args.write_checksums:
        path = pope.write_checksums(Path(args.checksums), out, names)
        print(f"wrote sha256 of {len(names)} images to {path}; ship it so that every later download is checked against it")
    print(f"all {len(names)} images in place: data.image_dir={out}")
    return 0


def _weights(args) -> int:
    from omegaconf import OmegaConf

    from prune_eval.assets import weights

    choices = sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))  # as config.group_choices("model"), without torch
    if args.model not in choices:
        raise unknown_choice("model", args.model, choices)
    model_cfg = OmegaConf.load(MODEL_DIR / f"{args.model}.yaml")
    if model_cfg.get("source") in ("tiny", "toy"):
        print(f"model={args.model} is {'built in code' if model_cfg.source == 'tiny' else 'shipped with prune_eval'}: nothing to download")
        return 0
    parts = [("id", "revision", "path")]
    if model_cfg.get("source") == "original":
        parts.append(("vision_tower", "vision_tower_revision", "vision_tower_path"))
    for id_key, revision_key, path_key in parts:
        revision = args.revision if id_key == "id" and args.revision else model_cfg.get(revision_key)
        snapshot = weights.fetch(model_cfg[id_key], revision=revision, endpoint=args.endpoint, setting=f"model.{path_key}")
        print(f"{snapshot.repo_id} @ {snapshot.commit or '(unknown commit)'}: {snapshot.path}")
    print(f"ready: model={args.model}" + (f" model.revision={args.revision}" if args.revision else ""))
    return 0


def parser() -> argparse.ArgumentParser:
    from prune_eval.assets import pope

    top = argparse.ArgumentParser(prog="python -m prune_eval.assets", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)

    def network(p, env: str) -> None:
        p.add_argument("--base-url", help=f"download from here instead (also ${env})")
        p.add_argument("--retries", type=int, default=3, help="attempts after the first, per file (resuming)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds without data before an attempt fails")

    q = commands.add_parser("pope-questions", help="POPE's coco_pope_<split>.json at the pinned commit, sha256-checked")
    q.add_argument("--version", default="llava-1.5", choices=sorted(pope.POPE_COMMITS), help="llava-1.5: 8910 questions (e3e3926); latest: 9000 (08d957b)")
    q.add_argument("--out", help="folder (default data/pope/VERSION, the data config's question_dir)")
    network(q, "PRUNE_EVAL_POPE_URL")
    q.set_defaults(run=_pope_questions)

    i = commands.add_parser("pope-images", help="the 500 COCO val2014 images POPE asks about")
    i.add_argument("--out", default="data/coco/val2014", help="folder (default data/coco/val2014, the data config's image_dir)")
    i.add_argument("--questions", help="take the image names from the coco_pope_<split>.json in this folder (default: the shipped list of 500)")
    i.add_argument("--jobs", type=int, default=8, help="parallel downloads")
    i.add_argument("--checksums", default=str(pope.CHECKSUMS_FILE), help="sha256 list to check against (sha256sum format)")
    i.add_argument("--write-checksums", action="store_true", help="once every image is in place and decodes, write their sha256 to --checksums")
    i.add_argument("--check", action="store_true", help="only verify the images already in --out; download nothing")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    network(i, "PRUNE_EVAL_COCO_URL")
    i.set_defaults(run=_pope_images)

    w = commands.add_parser("weights", help="a model's files from the Hugging Face Hub into its cache (resumable)")
    w.add_argument("--model", required=True, help="a conf/model choice, e.g. llava-1.5-7b, llava-1.5-7b-original")
    w.add_argument("--revision", help="a commit or tag of the checkpoint (default: the yaml's revision, else main)")
    w.add_argument("--endpoint", help="Hub address (default: huggingface_hub's, i.e. $HF_ENDPOINT or huggingface.co)")
    w.set_defaults(run=_weights)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except PruneEvalError as e:
        print(f"prune_eval.assets: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
