"""What the command line's overrides mean for a sweep, before any job is composed for real.

- Keys that decide where results go (`OUTPUT_KEYS`) cannot be swept, and no sweep may scatter its
  jobs over several sweep directories (`check_output_overrides`, `output_dir_problem`).
- An option that exists for some of the swept choices applies to those only (`applicable_jobs`):
  `method=visionzip,sparsevlm method.version=v1` sets SparseVLM's version and leaves VisionZip's jobs
  alone, and the launch plan says so; an option that exists for none of them is an error with "did
  you mean". Hydra itself would refuse the first (it composes every job, and its master config, with
  every override) and silently accept `++method.foo=bar`.

Torch-free: this runs before Hydra starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from omegaconf import DictConfig

from prune_eval.config import GROUPS, flat_keys
from prune_eval.errors import PruneEvalError, did_you_mean


# Keys that decide where results go. A sweep writes into one directory (hydra.sweep.dir =
# outputs/<name>) and each cell into the subdirectory its configuration names, which is how the
# plan, the status table, resuming and the report find the cells: sweeping any of these would
# scatter the cells where none of them looks.
OUTPUT_KEYS = {
    "name": "the sweep directory outputs/<name>",
    "hydra.sweep.dir": "the sweep directory",
    "hydra.sweep.subdir": "each cell's directory (named from its configuration)",
    "hydra.run.dir": "a single run's cell directory",
    "hydra.output_subdir": "where each job's .hydra config is saved",
    "hydra.launcher.submitit_folder": "where the launcher's job logs go",
}


def check_output_overrides(arguments: list[str]) -> None:
    """A sweep over a key that decides where results go (OUTPUT_KEYS) is one line naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in arguments if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return  # check_overrides says why it does not parse
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        if key in OUTPUT_KEYS and override.is_sweep_override():
            raise PruneEvalError(
                f"{override.input_line} sweeps over {key}, which decides {OUTPUT_KEYS[key]}; a sweep writes all its cells "
                f"into one directory, so give {key} one value and run one sweep per value"
            )


def output_dir_problem(jobs: list[list[str]], dirs: list[str], expected: str | None = None) -> str | None:
    """When the jobs of one sweep would write into different sweep directories (`dirs[i]` is job i's
    resolved hydra.sweep.dir; `expected`, if given, the sweep's own), one sentence naming the sweep
    overrides that move them (e.g. seed=0,1 with name=run${seed}); else None."""
    where = sorted(set(dirs) | ({expected} if expected else set()))
    if len(where) <= 1:
        return None
    values = [dict(o.split("=", 1) if "=" in o else (o, "") for o in job) for job in jobs]
    keys = sorted({k for v in values for k in v if len({v2.get(k) for v2 in values}) > 1})
    moving = []
    for key in keys:  # jobs equal in every other key but this one, in different directories
        groups: dict[str, set[str]] = {}
        for v, d in zip(values, dirs):
            groups.setdefault(json.dumps({k: x for k, x in v.items() if k != key}, sort_keys=True), set()).add(d)
        if any(len(g) > 1 for g in groups.values()):
            moving.append(f"{key}={','.join(dict.fromkeys(v[key] for v in values if key in v))}")
    through = f" through {', '.join(moving)}" if moving else ""
    return (f"the jobs of this sweep would write into {len(where)} directories ({', '.join(where[:4])}{', ...' if len(where) > 4 else ''})"
            f"{through}, but a sweep writes all its cells into one; run one sweep per directory")


@dataclass(frozen=True)
class _Override:
    text: str  # as written, e.g. "++method.version=v1"
    prefix: str  # "", "+", "++" or "~"
    key: str  # "method.version"
    sweep: bool

    @property
    def group(self) -> str | None:
        """The config group whose option this is ('method' for method.version), else None."""
        head = self.key.split(".", 1)[0]
        return head if "." in self.key and head in GROUPS else None

    @property
    def plain(self) -> str:
        return self.text[len(self.prefix):]


def _parse(texts: Sequence[str]) -> list[_Override]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, parsed in zip(texts, OverridesParser.create().parse_overrides(list(texts))):
        prefix = "++" if parsed.is_force_add() else "+" if parsed.is_add() else "~" if parsed.is_delete() else ""
        out.append(_Override(text, prefix, parsed.key_or_group, parsed.is_sweep_override()))
    return out


def _choice(cfg: DictConfig, group: str) -> str:
    """The group's chosen option in a composed config: Hydra's record of it, else its `name`."""
    try:
        return str(cfg.hydra.runtime.choices[group])
    except Exception:  # composed without Hydra's node
        node = cfg.get(group)
        return str(node.get("name", "?")) if isinstance(node, DictConfig) else "?"


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


@dataclass
class Applicability:
    """Per job, the overrides that apply to its choices, and what was left out where."""

    jobs: list[list[str]]
    left_out: dict[str, list[str]] = field(default_factory=dict)  # option key -> choices it does not apply to ("method=visionzip")
    applies_to: dict[str, list[str]] = field(default_factory=dict)  # option key -> choices it applies to

    def notes(self) -> list[str]:
        """One line per option left out of some jobs, for the launch plan."""
        return [f"{key} applies to {' and '.join(self.applies_to[key])} only; left out of the jobs with {' and '.join(choices)}, "
                f"which have no such option" for key, choices in self.left_out.items()]


def applicable_jobs(jobs: Sequence[Sequence[str]], compose: Callable[[list[str]], DictConfig]) -> Applicability:
    """Drop, from each job, the group options (`method.version=v1`, also with + or ++) that its group
    choice does not have, when another job's choice has them; a kept `+key=value` / `++key=value` on
    an existing key becomes `key=value` (the same thing). An option of a group (GROUP.KEY) that no
    job's choice has is a PruneEvalError with "did you mean" and the options there are (a group's
    options are what its YAMLs define); deeper keys added with + or ++ (model.dims.x) are left to
    Hydra. `compose(group overrides)` composes a job's choices alone (cached per distinct choice
    set). Jobs whose choices do not compose are returned unchanged: their composition error is said
    where they are composed for real.
    """
    parsed = [_parse(job) for job in jobs]
    bases: dict[tuple[str, ...], DictConfig | None] = {}

    def base_of(job: list[_Override]) -> DictConfig | None:
        choices = tuple(o.text for o in job if o.key in GROUPS)
        if choices not in bases:
            try:
                bases[choices] = compose(list(choices))
            except Exception:
                bases[choices] = None
        return bases[choices]

    options = {o.key: o for job in parsed for o in job if o.group and o.prefix != "~"}
    if not options:  # nothing to check or drop: compose nothing (~0.2 s a composition)
        return Applicability([[o.text for o in job] for job in parsed])
    job_bases = [base_of(job) for job in parsed]
    # exists[key][j]: job j's choice has the option (None: its choices do not compose)
    exists = {key: [None if b is None else _has_key(b, key) for b in job_bases] for key in options}
    for key, override in options.items():
        added_deeper = override.prefix in ("+", "++") and key.count(".") > 1
        if not any(exists[key]) and False in exists[key] and not added_deeper:
            raise _unknown_option(key, [b for b in job_bases if b is not None])
    result = Applicability([])
    for j, (job, base) in enumerate(zip(parsed, job_bases)):
        kept = []
        for o in job:
            flags = exists.get(o.key)
            here = None if flags is None else flags[j]
            if here is None or not any(flags):
                kept.append(o.text)
                continue
            choice = f"{o.group}={_choice(base, o.group)}"
            if here:
                kept.append(o.plain)
                _add(result.applies_to, o.key, choice)
            else:
                _add(result.left_out, o.key, choice)
        result.jobs.append(kept)
    result.applies_to = {k: v for k, v in result.applies_to.items() if k in result.left_out}
    return result


def _add(table: dict[str, list[str]], key: str, value: str) -> None:
    values = table.setdefault(key, [])
    if value not in values:
        values.append(value)


def _unknown_option(key: str, bases: list[DictConfig]) -> PruneEvalError:
    group = key.split(".", 1)[0]
    names = list(dict.fromkeys(_choice(b, group) for b in bases))
    keys = sorted({k for b in bases if isinstance(b.get(group), DictConfig) for k in flat_keys(b[group], group + ".")} - {f"{group}.name"})
    which = " or ".join(f"'{n}'" for n in names)
    prefix = group + "."
    hint = did_you_mean(key.removeprefix(prefix), [k.removeprefix(prefix) for k in keys]).replace("mean '", f"mean '{prefix}")
    return PruneEvalError(f"unknown key '{key}' for {group} {which}{hint} keys: {', '.join(keys) or '(none)'}")


def force_add_partial_options(arguments: list[str]) -> list[str]:
    """The command line for Hydra in a sweep: a group option given once (not swept) while its group
    is swept becomes `++key=value`. Hydra composes its master config with the group's default choice
    and every non-sweep override, so `method=visionzip,sparsevlm method.version=v1` would fail there
    (vanilla has no version); `++` adds it to the master and sets it where it exists, and the sweeper
    then applies it per job (applicable_jobs)."""
    positional = [a for a in arguments if not a.startswith("-")]
    try:
        parsed = dict(zip(positional, _parse(positional)))
    except Exception:
        return arguments
    swept_groups = {o.key for o in parsed.values() if o.sweep and o.key in GROUPS}
    if "experiment" in swept_groups:
        swept_groups |= set(GROUPS)
    return [f"++{a}" if a in parsed and parsed[a].prefix == "" and not parsed[a].sweep and parsed[a].group in swept_groups else a
            for a in arguments]
