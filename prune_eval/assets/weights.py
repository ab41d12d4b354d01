"""Checkpoints from the Hugging Face Hub: only the files a model needs, into the Hugging Face cache.

`fetch` asks the Hub for the repository's file list, picks the files evaluation reads (configs,
tokenizer, processor and the weights: safetensors when the repository has them, else
`pytorch_model*.bin`; never TensorFlow/Flax copies, optimizer states or training args) and downloads
them with `huggingface_hub.snapshot_download(allow_patterns=...)`, which resumes interrupted files.
A snapshot's folder name in the cache is the commit it came from: that is what gets recorded.

The Hub address is huggingface_hub's: set `HF_ENDPOINT` (or pass `endpoint`) to use a mirror;
`HF_HUB_OFFLINE=1` forbids network access and only the cache is looked at.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from prune_eval.errors import PruneEvalError

# Small files that evaluation may read, when the repository has them.
METADATA_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja",
)
SAFETENSORS = ("model*.safetensors", "model.safetensors.index.json")
TORCH_BIN = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
HUB_PAGE = "https://huggingface.co"


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    path: Path  # the snapshot folder in the Hugging Face cache
    commit: str | None  # the commit the snapshot came from (its folder name)


def needed_files(repo_files: list[str]) -> list[str]:
    """The files of a repository that evaluation reads; weights as safetensors if present, else .bin."""
    names = [f for f in repo_files if "/" not in f]  # top level only: no subfolder variants
    weights = [f for f in names if any(fnmatch.fnmatch(f, p) for p in SAFETENSORS)]
    if not any(f.endswith(".safetensors") for f in weights):
        weights = [f for f in names if any(fnmatch.fnmatch(f, p) for p in TORCH_BIN)]
    return sorted({f for f in names if f in METADATA_FILES} | set(weights))


def commit_of(snapshot: str | Path) -> str | None:
    path = Path(snapshot)
    return path.name if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name) else None


def cached_snapshot(repo_id: str, revision: str | None = None) -> Snapshot | None:
    """The cached snapshot of repo_id at revision (None = main), or None if its config is not cached."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config, str):
        return None
    path = Path(config).parent
    return Snapshot(repo_id, path, commit_of(path))


def manual_instructions(repo_id: str, *, setting: str = "model.path") -> str:
    return (f"download config.json, the tokenizer/preprocessor files and the weights (*.safetensors, else "
            f"pytorch_model*.bin) from {HUB_PAGE}/{repo_id} into a folder and set {setting}=FOLDER, or run "
            f"this command where the Hub can be reached and copy the Hugging Face cache (HF_HOME) here")


def _unreachable(endpoint: str, timeout: float = 10.0) -> str | None:
    """Why the Hub address cannot be reached at all (refused, no DNS, timeout), or None if it answers."""
    from urllib.error import HTTPError, URLError
    from urllib.request import urlopen

    try:
        urlopen(endpoint, timeout=timeout).close()
    except HTTPError:
        return None  # it answered
    except (URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"{type(reason).__name__}: {reason}"
    return None


def fetch(repo_id: str, *, revision: str | None = None, endpoint: str | None = None, setting: str = "model.path") -> Snapshot:
    """Download what evaluation needs from repo_id into the Hugging Face cache (resumable)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        cached = cached_snapshot(repo_id, revision)
        if cached is not None:
            return cached
        raise PruneEvalError(f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading; "
                             + manual_instructions(repo_id, setting=setting))
    unreachable = _unreachable(endpoint or constants.ENDPOINT)
    if unreachable:  # huggingface_hub would retry for ~25 s before saying the same
        raise PruneEvalError(f"cannot reach the Hugging Face Hub at {endpoint or constants.ENDPOINT} ({unreachable}); "
                             + manual_instructions(repo_id, setting=setting))
    try:
        files = HfApi(endpoint=endpoint).list_repo_files(repo_id, revision=revision)
        needed = needed_files(files)
        if not any(f.endswith((".safetensors", ".bin")) for f in needed):
            raise PruneEvalError(f"{repo_id} has no weights evaluation can read (model*.safetensors or pytorch_model*.bin)")
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=needed, endpoint=endpoint))
    except PruneEvalError:
        raise
    except Exception as e:  # network, authentication, unknown repository or revision: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PruneEvalError(f"cannot download {repo_id} from {endpoint or constants.ENDPOINT} "
                             f"({type(e).__name__}: {first}); " + manual_instructions(repo_id, setting=setting)) from None
    return Snapshot(repo_id, path, commit_of(path))
