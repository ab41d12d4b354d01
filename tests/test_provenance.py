"""What a result or a benchmark says produced it: the git commit and whether the tree differed from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from prune_eval.provenance import commit_label, git_state


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return tmp_path


def test_a_clean_tree_is_named_by_its_commit(repo: Path, monkeypatch) -> None:
    monkeypatch.delenv("PRUNE_EVAL_COMMIT", raising=False)
    head = git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == {"commit": head, "dirty": False}
    assert commit_label(repo) == head[:7]


def test_changed_tracked_files_are_flagged(repo: Path, monkeypatch) -> None:
    # the device machine's copy of a tree can carry a stale .git under later files: the label says so
    monkeypatch.delenv("PRUNE_EVAL_COMMIT", raising=False)
    (repo / "code.py").write_text("x = 2\n")
    (repo / "untracked.txt").write_text("not part of the code\n")
    head = git(repo, "rev-parse", "HEAD")
    assert git_state(repo)["dirty"] is True
    assert commit_label(repo) == f"{head[:7]} (uncommitted changes)"


def test_an_explicit_commit_wins_and_no_git_gives_none(repo: Path, tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("PRUNE_EVAL_COMMIT", "82aad31")
    assert commit_label(repo) == "82aad31"
    monkeypatch.delenv("PRUNE_EVAL_COMMIT")
    outside = tmp_path_factory.mktemp("no-git")
    assert commit_label(outside) is None
