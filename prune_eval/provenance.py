"""What produced a result: library versions, git commit, host and device, for every cell summary."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

LIBRARIES = (
    "prune_eval", "torch", "transformers", "tokenizers", "bitsandbytes", "numpy", "pillow",
    "hydra-core", "omegaconf", "submitit", "hydra-submitit-launcher",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(repo: Path | None = None) -> dict[str, object]:
    """Commit of the prune_eval checkout and whether it had uncommitted changes."""
    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def commit_label(repo: Path | None = None) -> str | None:
    """The commit a benchmark ran: PRUNE_EVAL_COMMIT when set, else the checkout's HEAD (short),
    with " (uncommitted changes)" when the tracked files differ from it. The device machine's copy of
    the tree can carry a stale .git (the checkout's first commit under later files): the suffix flags
    that, and PRUNE_EVAL_COMMIT names the real one."""
    if os.environ.get("PRUNE_EVAL_COMMIT"):
        return os.environ["PRUNE_EVAL_COMMIT"]
    state = git_state(repo)
    if not state["commit"]:
        return None
    return str(state["commit"])[:7] + (" (uncommitted changes)" if state["dirty"] else "")


def host_info() -> dict[str, object]:
    info: dict[str, object] = {"hostname": socket.gethostname(), "platform": platform.platform()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    except Exception:  # provenance must never fail a run
        pass
    return info


def environment() -> dict[str, object]:
    return {"versions": library_versions(), "git": git_state(), "host": host_info()}
