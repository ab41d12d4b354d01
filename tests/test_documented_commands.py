"""Every command in README.md and docs/*.md runs, so a documented command can never be refused again.

The fenced ```bash blocks are read from the files themselves (a new block or a new line in one is a
new test case) and split into commands. Each command must match one rule below, which says how it
is run here; a command no rule knows fails the test. Each block runs as one bash session in a
sandbox (its own working directory with `../shared` beside it, no network, an empty Hugging Face
cache), commands in order, so assignments (`P=...`), `eval "$(...)"` and files written by one
command (a trained toy, answer files) carry over to the next, as they would for a reader.

How a command runs here, when it cannot run as written:
- real checkpoints and POPE (`model=llava-1.5-7b`) -> `experiment=demo` (the shipped toy on synthetic
  POPE, CPU) with `data.n_images=1 eval.max_new_tokens=2`; `eval.compile=true` -> false (a GPU speed
  option; tests/test_fast.py checks it changes no answer);
- SLURM without sbatch and local GPUs without a GPU: the documented one-line refusal (exit 2);
- downloads: no network here, so the documented one-line "fetch by hand" message (exit 2);
- `pip install`, `apt-get install`: what CI (.ci/run) runs on a fresh machine: checked to be there;
- `python -m pytest ...`: collected, not run (this is that run);
- `python -m prune_eval.toy train`: a few steps on the CPU instead of 8 minutes on a GPU.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, SHARED

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NO_NETWORK = "http://127.0.0.1:9"  # nothing listens on the discard port: a refused connection, at once
CHEAP = ["data.n_images=1", "eval.max_new_tokens=2"]


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every ```bash block."""
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M)]


def split_commands(block: str) -> list[str]:
    """Commands of a block: continuation lines joined, a heredoc or a for/while loop kept whole,
    blank lines and comment lines dropped."""
    lines, commands, i = block.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command = [line]
        while command[-1].endswith("\\") and i < len(lines):
            command.append(lines[i])
            i += 1
        heredoc = re.search(r"<<-?\s*'?(\w+)'?", line)
        if heredoc:
            while i < len(lines):
                command.append(lines[i])
                i += 1
                if command[-1].strip() == heredoc.group(1):
                    break
        if re.match(r"\s*(for|while)\b", line):
            depth = 1
            while depth and i < len(lines):
                command.append(lines[i])
                depth += bool(re.match(r"\s*(for|while)\b", lines[i])) - bool(re.match(r"\s*done\b", lines[i]))
                i += 1
        commands.append("\n".join(command))
    return commands


def words(command: str) -> list[str]:
    """The command's words, comments dropped (for matching rules; bash runs the text itself)."""
    try:
        return shlex.split(command.replace("\\\n", " "), comments=True)
    except ValueError:
        return command.split()


# ----------------------------------------------------------------------------------------------
# Rules: how each kind of documented command runs here, and what it must do.
@dataclass
class Plan:
    run: str | None  # the shell text to run in the session; None: not run here (check says why that is fine)
    env: dict[str, str] = field(default_factory=dict)
    expect: str = "ok"  # "ok": exit 0; "refused": exit 2 with one error line containing `message`
    message: str = ""
    check: Callable[[], None] | None = None  # a check that needs no run (the command is CI's own, ...)
    subshell: bool = True  # False: assignments and `eval` whose effect the next commands need


def ci_script() -> str:
    return (REPO / ".ci" / "run").read_text()


def plan_pip(command: str) -> Plan:
    def check() -> None:  # CI installs prune_eval exactly so, on a fresh machine
        args = words(command)[2:]
        ci = [words(line) for line in ci_script().splitlines() if "pip install" in line]
        assert any(w[-len(args) - 3:] == ["pip", "install", "-q", *args] for w in ci), f"CI does not run `pip install {shlex.join(args)}`"
    return Plan(None, check=check)


def plan_apt(command: str) -> Plan:
    def check() -> None:
        packages = [w for w in words(command)[2:] if not w.startswith("-") and w not in ("install", "update", "&&", "apt-get")]
        installed = " ".join(line for line in ci_script().splitlines() if "apt-get install" in line).split()
        assert set(packages) <= set(installed), f"CI's apt-get does not install {set(packages) - set(installed)}"
        assert "apt-get update" in ci_script()
    return Plan(None, check=check)


def plan_git_add(command: str) -> Plan:
    def check() -> None:  # the file `pope-images --write-checksums` writes, which a maintainer then commits
        from prune_eval.assets.pope import CHECKSUMS_FILE

        assert words(command)[2:] == [str(CHECKSUMS_FILE.relative_to(REPO))]
    return Plan(None, check=check)


def plan_pytest(command: str) -> Plan:
    # This test runs inside that very command; collecting proves the selection is valid and non-empty.
    return Plan(f"{command.split('#')[0].strip()} --collect-only -q -p no:cacheprovider {REPO / 'tests'}", expect="collected")


def plan_toy_train(command: str) -> Plan:
    args = words(command)
    args[args.index("--device") + 1] = "cpu"
    args[args.index("--workers") + 1] = "0"
    args += ["--vision-steps", "1", "--align-steps", "1", "--steps", "1", "--images-per-step", "2", "--log-every", "1"]
    return Plan(shlex.join(args))


def plan_prune_eval(command: str) -> Plan:
    args = [a for a in words(command) if a != "..."]  # `...`: "and the rest of a command as above"
    if "..." in words(command):
        args.append("method=vanilla")
    head = args[:3] + [a for a in args[3:] if a.startswith("-")]  # python -m prune_eval [-m]
    overrides = [a for a in args[3:] if not a.startswith("-")]
    overrides = [re.sub(r"^model=llava-1\.5-\d+b(-original)?$", "model=toy", o) for o in overrides]
    overrides = ["eval.compile=false" if o == "eval.compile=true" else o for o in overrides]
    overrides = ["experiment=demo", *[o for o in overrides if o != "experiment=demo"], *CHEAP]
    text = shlex.join([*head, *overrides])
    if any(o == "launch=slurm" for o in overrides):  # refused before anything is submitted
        return Plan(text, env={"PATH": "{bin}"}, expect="refused", message="launch=slurm needs `sbatch`, which is not on PATH")
    if any(o == "launch=local-gpus" for o in overrides):
        return Plan(text, env={"CUDA_VISIBLE_DEVICES": ""}, expect="refused", message="GPU")
    return Plan(text)


def plan_assets(command: str) -> Plan:
    args = words(command)
    if args[3] in ("pope-questions", "pope-images"):
        args += ["--retries", "0"]
        return Plan(shlex.join(args), expect="refused", message="by hand")
    return Plan(shlex.join(args), expect="refused", message="not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading")


def plan_as_written(command: str) -> Plan:
    return Plan(command)


RULES: list[tuple[str, Callable[[str], Plan], bool]] = [  # (pattern on the words, plan, slow)
    (r"^pip install ", plan_pip, False),
    (r"^apt-get (update|install) ", plan_apt, False),
    (r"^git add ", plan_git_add, False),
    (r"^python -m pytest\b", plan_pytest, True),
    (r"^python -m prune_eval\.toy train ", plan_toy_train, True),
    (r"^python -m prune_eval\.assets ", plan_assets, False),
    (r"^python -m prune_eval -m .*launch=(slurm|local-gpus)", plan_prune_eval, False),
    (r"^python -m prune_eval ", plan_prune_eval, True),
    (r"^python -m prune_eval\.(ingest|report) ", plan_as_written, True),  # placeholders: see PLACEHOLDERS
    (r"^python - <<", plan_as_written, True),  # the worked example's answer files
    (r"^for pair in .* python -m prune_eval\.ingest ", plan_as_written, True),
    (r"^mkdir -p outputs$", plan_as_written, False),
    (r"^P=\S+$", lambda c: Plan(c, subshell=False), False),
    (r"^scripts/slurm-local\.sh ", plan_as_written, True),
    (r"^eval \$\(scripts/slurm-local\.sh env\)", lambda c: Plan(c, subshell=False), True),
    (r"^sinfo; sbatch ", plan_as_written, True),
]

# Placeholders a reader replaces with their own files.
PLACEHOLDERS = {
    "--questions llava_pope_test.jsonl": "--questions ../shared/data/pope/llava-1.5/llava_pope_test.jsonl",
    "--labels POPE_DIR": "--labels ../shared/data/pope/llava-1.5",
    "--answers answers.jsonl": "--answers ../shared/data/pope/reference-answers/llava-v1.5-13b.jsonl",
}


def rule_for(command: str) -> tuple[Callable[[str], Plan], bool] | None:
    flat = " ".join(words(command)) if "<<" not in command else command.splitlines()[0]
    for pattern, plan, slow in RULES:
        if re.search(pattern, flat):
            return plan, slow
    return None


def cases() -> list:
    params = []
    for path in DOC_FILES:
        for line, block in bash_blocks(path):
            commands = split_commands(block)
            rules = [rule_for(c) for c in commands]
            marks = []
            if any(r and r[1] for r in rules):
                marks.append(pytest.mark.slow)
            if any(c.startswith(("scripts/slurm-local.sh", "sinfo")) for c in commands):
                marks.append(pytest.mark.slurm)
            params.append(pytest.param(path, line, block, marks=marks, id=f"{path.relative_to(REPO)}:{line}"))
    return params


# ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    command: str
    plan: Plan
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""


def sandbox(root: Path) -> tuple[Path, dict[str, str]]:
    """A working directory with ../shared beside it and scripts/ in it; `python` is this interpreter."""
    work, bin_dir = root / "work", root / "bin"
    work.mkdir(parents=True)
    bin_dir.mkdir()
    (root / "shared").symlink_to(SHARED.resolve())
    (work / "scripts").symlink_to(REPO / "scripts")
    (bin_dir / "python").symlink_to(sys.executable)
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1",
        "PRUNE_EVAL_POPE_URL": NO_NETWORK, "PRUNE_EVAL_COCO_URL": NO_NETWORK, "HYDRA_FULL_ERROR": "0",
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]),
    }
    return work, env


def slurm_env(env: dict[str, str]) -> dict[str, str]:
    """A private state directory and free ports for the documented slurm-local.sh session."""
    from slurm_fixtures import _skip_or_fail, free_port_block, missing_commands

    if missing_commands():
        _skip_or_fail(f"SLURM commands not installed: {', '.join(missing_commands())}", "PRUNE_EVAL_REQUIRE_SLURM")
    if os.geteuid() != 0:
        _skip_or_fail("the local SLURM cluster must be started as root", "PRUNE_EVAL_REQUIRE_SLURM")
    import tempfile

    base = free_port_block(4)
    state = tempfile.mkdtemp(prefix="pe-docs-slurm-", dir="/tmp")  # munged needs world-traversable parents
    return {**env, "PRUNE_EVAL_SLURM_DIR": state, "PRUNE_EVAL_SLURM_CTLD_PORT": str(base),
            "PRUNE_EVAL_SLURM_SLURMD_PORT": str(base + 1), "PRUNE_EVAL_SLURM_DBD_PORT": str(base + 2),
            "PRUNE_EVAL_SLURM_DB_PORT": str(base + 3)}


def run_block(block: str, root: Path) -> tuple[list[Outcome], Path]:
    """Run a block's commands in order in one bash session; each command's exit code and output."""
    work, env = sandbox(root)
    commands = split_commands(block)
    outcomes = []
    for command in commands:
        found = rule_for(command)
        if found is None:
            outcomes.append(Outcome(command, Plan(None, expect="no rule")))
            continue
        text = command
        for placeholder, value in PLACEHOLDERS.items():
            text = text.replace(placeholder, value)
        outcomes.append(Outcome(command, found[0](text)))
    slurm = any(c.startswith("scripts/slurm-local.sh") for c in commands)
    if slurm:
        env = slurm_env(env)
    script = ["set +e"]
    for i, outcome in enumerate(outcomes):
        plan = outcome.plan
        if plan.run is None:
            continue
        exports = "".join(f"export {k}={shlex.quote(v.replace('{bin}', str(root / 'bin')))}; " for k, v in plan.env.items())
        body = f"{exports}{plan.run}"
        redirect = f"> {root}/out{i} 2> {root}/err{i}"
        opening, closing = ("(", ")") if plan.subshell else ("{", "}")  # { }: assignments and exports stay for the next commands
        script.append(f"{opening} {body}\n{closing} {redirect}; echo $? > {root}/rc{i}")
    try:
        subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, timeout=1500, check=False)
    finally:
        if slurm:  # whatever happened, leave no daemons behind
            subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), "stop", "--purge"], cwd=work, env=env,
                           capture_output=True, timeout=120, check=False)
    for i, outcome in enumerate(outcomes):
        if (root / f"rc{i}").exists():
            outcome.returncode = int((root / f"rc{i}").read_text())
            outcome.stdout, outcome.stderr = (root / f"out{i}").read_text(), (root / f"err{i}").read_text()
    return outcomes, work


RESULTS: dict[str, tuple[list[Outcome], Path]] = {}  # identical blocks (README and docs/) run once


@pytest.mark.parametrize(("path", "line", "block"), cases())
def test_every_documented_command_runs(path: Path, line: int, block: str, tmp_path_factory) -> None:
    if block not in RESULTS:
        RESULTS[block] = run_block(block, tmp_path_factory.mktemp("docs"))
    outcomes, work = RESULTS[block]
    for outcome in outcomes:
        plan, where = outcome.plan, f"{path.name}:{line}: `{outcome.command.splitlines()[0]}`"
        assert plan.expect != "no rule", f"{where}: no rule in {Path(__file__).name} says how to run this documented command; add one"
        if plan.run is None:
            plan.check()
            continue
        output = f"\n--- stdout\n{outcome.stdout[-2000:]}\n--- stderr\n{outcome.stderr[-3000:]}"
        assert outcome.returncode is not None, f"{where}: did not run{output}"
        if plan.expect == "refused":
            lines = [x for x in outcome.stderr.splitlines() if x.strip()]
            assert outcome.returncode == 2 and len(lines) == 1 and plan.message in lines[0], f"{where}: expected the documented refusal{output}"
        elif plan.expect == "collected":
            assert outcome.returncode == 0 and re.search(r"\b\d+ tests? collected|^\d+/\d+ tests collected", outcome.stdout, re.M), f"{where}{output}"
        else:
            assert outcome.returncode == 0, f"{where}: exit {outcome.returncode}{output}"
    if "prune_eval.report outputs/compare" in block:  # the worked example's report, and nothing outside outputs/
        report = (work / "outputs" / "compare" / "report" / "report.md").read_text()
        assert "VisionZip Table 1 prints VisionZip 77.0 vs SparseVLM v1 75.1" in report
        assert "The reversal is explained by the SparseVLM version" in report
        assert sorted(p.name for p in work.iterdir()) == ["outputs", "scripts"]


def test_the_rules_cover_every_documented_command() -> None:
    """Cheap and quick: a new documented command without a rule fails here, not only in the slow run."""
    unknown = [f"{path.name}:{line}: {c.splitlines()[0]}" for path in DOC_FILES for line, block in bash_blocks(path)
               for c in split_commands(block) if rule_for(c) is None]
    assert not unknown, "documented commands no rule knows:\n" + "\n".join(unknown)
    assert sum(len(split_commands(b)) for path in DOC_FILES for _, b in bash_blocks(path)) > 20
