"""Resumable, verified HTTP downloads with the standard library only.

A file is written to `NAME.part`, continued with a `Range: bytes=N-` request when an earlier attempt
left N bytes there, checked by the caller (`check(path) -> problem or None`: size, decodability,
checksum) and only then renamed to NAME. So a file under its final name has always passed the check;
an interrupted transfer leaves only a `.part` (resumed next time) and a corrupt one leaves nothing.
"""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

CHUNK = 1 << 16
USER_AGENT = "prune_eval-assets/1"
NO_RETRY = (400, 401, 403, 404, 410)  # client errors that a retry does not fix

# Outcome statuses
PRESENT, DOWNLOADED, MISSING, CORRUPT, FAILED = "present", "downloaded", "missing", "corrupt", "failed"


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # present | downloaded | missing (HTTP 404) | corrupt (failed the check) | failed (network)
    detail: str = ""
    unreachable: bool = False  # the server could not be reached at all (connection refused, DNS, ...)


class _ShortTransfer(Exception):
    pass


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _describe(error: BaseException) -> tuple[str, bool]:
    """(one-line description, whether the server was unreachable rather than cut off mid-transfer)."""
    if isinstance(error, URLError) and not isinstance(error, HTTPError):
        reason = error.reason
        return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason), True
    return f"{type(error).__name__}: {error}", False


def fetch(url: str, dest: Path, *, check: Callable[[Path], str | None], timeout: float = 30.0,
          retries: int = 3, backoff: float = 0.5) -> Outcome:
    """Download url to dest through dest.part (resuming it), check it, then rename it into place."""
    part = part_path(dest)
    last, unreachable = "", False
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
        try:
            with urlopen(Request(url, headers=headers), timeout=timeout) as response:
                resumed = offset > 0 and response.status == 206
                length = response.headers.get("Content-Length")
                expected = (offset if resumed else 0) + int(length) if length is not None else None
                with open(part, "ab" if resumed else "wb") as out:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
            size = part.stat().st_size
            if expected is not None and size < expected:
                raise _ShortTransfer(f"connection closed after {size} of {expected} bytes")
        except HTTPError as e:
            if e.code == 416 and offset:  # nothing after the bytes we have: the .part may be complete
                pass
            elif e.code in NO_RETRY:
                part.unlink(missing_ok=True)
                return Outcome(dest.name, MISSING if e.code in (404, 410) else FAILED, f"HTTP {e.code} at {url}")
            else:
                last, unreachable = f"HTTP {e.code} at {url}", False
                continue
        except (URLError, OSError, http.client.HTTPException, _ShortTransfer) as e:
            last, unreachable = _describe(e)
            continue
        problem = check(part)
        if problem:
            part.unlink(missing_ok=True)
            return Outcome(dest.name, CORRUPT, problem)
        os.replace(part, dest)
        return Outcome(dest.name, DOWNLOADED)
    kept = ""
    if part.exists():
        if part.stat().st_size:
            kept = f"; {part.stat().st_size} bytes kept in {part.name} for the next try"
        else:
            part.unlink()
    return Outcome(dest.name, FAILED, f"{last} (after {retries + 1} attempt(s)){kept}", unreachable=unreachable)
