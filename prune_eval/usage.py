"""`python -m prune_eval --help`: prune_eval's own usage, built from the config files themselves.

The groups, their choices and defaults, and the plain keys with their defaults are read from
`conf/config.yaml`, `conf/<group>/` and `launch/`, so the text cannot fall behind the configs (a
test checks that every plain key has a line here). Hydra's generic help stays at `--hydra-help`.
Imports neither torch nor Hydra's config loader: help is instant.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from prune_eval.config import CONF_DIR, GROUPS, group_choices

GROUP_HELP = {
    "model": "checkpoint (hub id or model.path) and tokenization",
    "method": "pruning method; its options are method.<key> (e.g. method.version for sparsevlm)",
    "quant": "dtype / bitsandbytes quantization and what it covers",
    "data": "POPE version and splits (data.version, data.splits), or synthetic POPE",
    "preprocess": "pad: LLaVA-1.5's expand2square; crop: llava-hf's centre crop",
    "experiment": "presets (demo: the shipped toy model, synthetic POPE, CPU)",
    "launch": "where cells run: this process, one per local GPU, or SLURM job arrays",
}

PLAIN_KEY_HELP = {
    "budget": "visual tokens (VisionZip/random: entering the LLM; SparseVLM: its nominal 32-layer average; vanilla: ignored)",
    "seed": "run seed (random baseline, SparseVLM's clustering); greedy decoding otherwise",
    "name": "sweep name: results go to outputs/<name>/",
    "device": "auto | cpu | cuda | cuda:N",
    "eval.fast": "auto: the shared-prefix fast path on CUDA, the reference path elsewhere; true/false force one",
    "eval.batch_size": "reference path: questions per batch",
    "eval.batch_images": "fast path: images per batch at most",
    "eval.batch_tokens": "fast path: prompt tokens per batch at most",
    "eval.compile": "torch.compile the decoder layers (GPU)",
    "eval.max_new_tokens": "answer length limit (128: LLaVA's POPE setting)",
    "eval.stop_when_decided": "stop once '.' or EOS fixes the answer under both parsing rules",
    "eval.part_size": "questions per record part (the most a kill can lose)",
    "eval.shard_images": "images per shard: the unit in which workers share a large cell",
    "eval.allow_mixed_numerics": "let a resumed cell mix record parts computed under different numerics (recorded)",
}

EXAMPLES = (
    ("the demo: toy model, synthetic POPE, CPU, no downloads",
     "python -m prune_eval -m experiment=demo method=vanilla,visionzip,random budget=16,64 seed=0,1"),
    ("VisionZip vs SparseVLM at 64 tokens on LLaVA-1.5-7B, five seeds",
     "python -m prune_eval -m method=visionzip,sparsevlm seed=0,1,2,3,4"),
    ("the same on SLURM, three budgets",
     "python -m prune_eval -m launch=slurm launch.partition=gpu method=visionzip,sparsevlm budget=64,128,192"),
)


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def plain_keys() -> dict[str, str]:
    """{key: default} of the top-level config's own keys (no groups, no hydra), eval.* flattened."""
    top = OmegaConf.load(CONF_DIR / "config.yaml")
    keys: dict[str, str] = {}
    for key in top:
        if key in ("defaults", "hydra"):
            continue
        node = top[key]
        if OmegaConf.is_dict(node):
            keys.update({f"{key}.{k}": _text(node[k]) for k in node})
        else:
            keys[str(key)] = _text(node)
    return keys


def group_defaults() -> dict[str, str]:
    """{group: default choice} from config.yaml's defaults list."""
    defaults: dict[str, str] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults):
        if isinstance(entry, dict):
            (group, choice), = entry.items()
            if group in GROUPS:
                defaults[group] = "none" if choice is None else str(choice)
    return defaults


def usage() -> str:
    defaults = group_defaults()
    keys = plain_keys()
    width = max(len(f"{k}={v}") for k, v in keys.items()) + 2
    lines = [
        "usage: python -m prune_eval [-m] [GROUP=CHOICE ...] [KEY=VALUE ...]",
        "",
        "Evaluates cells on POPE and compares them. A cell is one (model, quant, preprocess, data, method",
        "and budget, seed): the per-question answers of that configuration, its metrics and provenance.",
        "Without -m one cell runs; with -m comma-separated values sweep (every combination is a job),",
        "every job is validated before any runs, jobs that resolve to the same cell run once, and",
        "complete cells are skipped, so rerunning a sweep resumes it.",
        "",
        "Config groups (GROUP=CHOICE; default in brackets):",
    ]
    for group in GROUPS:
        choices = ", ".join(group_choices(group))
        lines.append(f"  {group:11} {choices}  [{defaults.get(group, 'none')}]")
        lines.append(f"  {'':11} {GROUP_HELP[group]}")
    lines += ["", "Plain keys (KEY=VALUE; shown with their defaults):"]
    for key, default in keys.items():
        lines.append(f"  {f'{key}={default}':{width}}{PLAIN_KEY_HELP.get(key, '')}")
    lines += [
        "  A group's own options are GROUP.KEY=VALUE (method.version=v1, data.splits=[random], model.path=DIR);",
        "  `python -m prune_eval [overrides] --cfg job` prints the composed config with every key.",
        "",
        "Examples:",
    ]
    for what, command in EXAMPLES:
        lines += [f"  # {what}", f"  {command}"]
    lines += [
        "",
        "Results: outputs/<name>/<cell>/records/ (one JSON line per question) and summary.json (config,",
        "metrics, versions, checksums) for every cell, relative to the current directory; the variance",
        "report in outputs/<name>/report/ (report.md, .html, .csv, .tex, figures) when a sweep ends;",
        "`python -m prune_eval.report outputs/<name>` rewrites it at any time.",
        "",
        "Bad choices and keys are one line with \"did you mean\" (exit 2). README.md has the details;",
        "Hydra's own options: --hydra-help.",
    ]
    return "\n".join(lines)
