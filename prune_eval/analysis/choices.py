"""The config groups' choices, read from conf/ without importing torch.

Why: `prune_eval.ingest --model ... --method ... --quant ... --preprocess ...` must accept exactly
what a sweep accepts (conf/model, conf/method, conf/quant, conf/preprocess: one YAML per choice,
whose file name is its registry name) and refuse anything else in one line with the choices, while the
analysis side stays torch-free (the method registry imports torch). tests/test_ingest_metadata.py
checks these lists against the registries themselves.
"""

from __future__ import annotations

from prune_eval.analysis.published import normalize_version
from prune_eval.config import group_choices  # torch-free: the names of conf/<group>/*.yaml
from prune_eval.errors import PruneEvalError, unknown_choice

# The methods with algorithm versions (prune_eval.methods.sparsevlm.VERSIONS; a test keeps them equal).
METHOD_VERSIONS = {"sparsevlm": ("v1", "v1.5", "v2")}


def check_choice(group: str, value: str | None) -> str | None:
    """`value` if it is one of the group's choices (None passes); else the one-line error."""
    if value is None:
        return None
    choices = group_choices(group)
    if value not in choices:
        raise unknown_choice(group, value, choices)
    return value


def check_metadata(*, model: str | None, method: str | None, version: str | None, budget: int | None,
                   quant: str | None = None, preprocess: str | None = None) -> dict:
    """Validated metadata of an ingested answer file (see prune_eval.analysis.ingest)."""
    given = {"--model": model, "--method": method, "--version": version, "--budget": budget, "--quant": quant,
             "--preprocess": preprocess}
    if method is None:
        stray = [flag for flag, v in given.items() if v is not None and flag != "--model"]
        if stray:
            raise PruneEvalError(f"{stray[0]} describes a method; give --method too (choices: {', '.join(group_choices('method'))})")
    check_choice("model", model)
    check_choice("method", method)
    check_choice("quant", quant)
    check_choice("preprocess", preprocess)
    versions = METHOD_VERSIONS.get(method or "", ())
    if version is not None:
        if not versions:
            raise PruneEvalError(f"--version {version}: method '{method}' has no algorithm versions"
                                 + (f" (only {', '.join(METHOD_VERSIONS)} has)" if METHOD_VERSIONS else "")
                                 + "; the POPE question-file version is --pope-version")
        version = normalize_version(version)
        if version not in versions:
            raise unknown_choice(f"version of {method}", version, versions)
    elif versions:
        raise PruneEvalError(f"--method {method} needs --version ({', '.join(versions)}): its versions are different "
                             "algorithms with different published numbers")
    if method is not None and method != "vanilla" and budget is None:
        raise PruneEvalError(f"--method {method} needs --budget (the visual-token budget the answers were produced at)")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise PruneEvalError(f"--budget {budget}: must be a positive whole number of visual tokens")
    return {"model": model, "method": method, "version": version, "budget": budget if method != "vanilla" else None,
            "quant": quant, "preprocess": preprocess}
