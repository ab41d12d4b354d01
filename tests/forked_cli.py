"""`python tests/forked_cli.py`: a fork server for `python -m prune_eval`, for the kill campaign.

Why: a fresh `python -m prune_eval` spends ~4 s of CPU importing hydra, torch and transformers before
it does anything a kill could hurt; 50+ kills plus their reruns would not fit in CI. This process
imports the CLI and everything a sweep loads once, then forks one child per request. The child is a
new process session that runs exactly what `python -m prune_eval ARGS` runs (prune_eval.__main__
.main with sys.argv, its own cwd, environment and log file), so a SIGKILL hits a real sweep process;
only the imports happened before the fork. Single-threaded, so forking is safe.

Protocol (JSON lines): request on stdin `{"cwd", "args", "env", "log"}`; replies on stdout
`{"pid": P}` when the child started, then `{"pid": P, "returncode": R}` when it ended (R = -9 for
SIGKILL, as subprocess reports it).
"""

from __future__ import annotations

import json
import os
import signal
import sys


def preload() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  the report's figures

    import hydra_plugins.prune_eval_plugins.sweeper  # noqa: F401
    import prune_eval.__main__  # noqa: F401
    import prune_eval.execution.cell  # noqa: F401  torch, transformers, the engine
    import prune_eval.models.tiny  # noqa: F401
    import prune_eval.analysis.render  # noqa: F401
    import prune_eval.analysis.report  # noqa: F401
    from prune_eval.methods import method_names

    method_names()  # imports every method module


def child(request: dict) -> None:
    code = 1
    try:
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        sys.argv = ["prune_eval", *request["args"]]
        from prune_eval.__main__ import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"pid": pid, "returncode": code}), flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    serve()
