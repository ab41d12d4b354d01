"""`python -m prune_eval.assets`: downloads against a local HTTP server on 127.0.0.1 (no external network).

The server (http.server in a thread) serves synthetic JPEGs, a corrupt file, nothing (404) for a
missing one, and cuts chosen transfers after half their bytes; it honours Range requests so that
resuming can be observed. Bounded: every client timeout is a few seconds, retries have no backoff.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import POPE, run_cli
from PIL import Image

from prune_eval.assets import pope, weights
from prune_eval.data.pope import KNOWN_VERSIONS, SPLITS
from prune_eval.errors import PruneEvalError

FAST = {"retries": 2, "backoff": 0.0, "timeout": 5.0}


def jpeg(seed: int, size=(48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


class Server:
    """Files by URL path; `cut` maps a path to how many more full requests to cut after half the bytes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers.get("Range") else 0
                if start >= len(data) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not start and server.cut.get(self.path, 0) > 0:
                    server.cut[self.path] -= 1
                    self.wfile.write(data[: len(data) // 2])  # HTTP/1.0: the connection closes after this
                    return
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def asked_for(self, name: str) -> list[str | None]:
        return [r for path, r in self.requests if path.endswith("/" + name)]


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


NAMES = [f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3, 4, 5)]
GOOD, GOOD2, CUT, CORRUPT, MISSING = NAMES


def serve_images(server: Server, *, cut_times: int = 1) -> dict[str, bytes]:
    data = {name: jpeg(i) for i, name in enumerate(NAMES)}
    data[CORRUPT] = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 40
    for name in (GOOD, GOOD2, CUT, CORRUPT):
        server.files[f"/val2014/{name}"] = data[name]
    server.cut[f"/val2014/{CUT}"] = cut_times
    return data


def fetch(server: Server, out: Path, names=NAMES, **kw):
    return pope.fetch_images(list(names), out, base_url=server.url + "/val2014", jobs=3, progress=False, **{**FAST, **kw})


def statuses(report) -> dict[str, str]:
    return {o.name: o.status for o in report.outcomes}


# ----------------------------------------------------------------------------------------------
# Images
def test_missing_and_corrupt_are_reported_and_a_cut_transfer_resumes(server, tmp_path) -> None:
    data = serve_images(server)
    report = fetch(server, tmp_path)
    assert statuses(report) == {GOOD: "downloaded", GOOD2: "downloaded", CUT: "downloaded", CORRUPT: "corrupt", MISSING: "missing"}
    assert not report.ok
    assert server.asked_for(CUT) == [None, f"bytes={len(data[CUT]) // 2}-"]  # the second request resumed
    assert (tmp_path / CUT).read_bytes() == data[CUT]
    assert sorted(os.listdir(tmp_path)) == sorted([GOOD, GOOD2, CUT])  # nothing partial, corrupt or empty left
    lines = "\n".join(report.lines())
    assert f"corrupt: {CORRUPT}: not a decodable image" in lines and f"missing: {MISSING}: HTTP 404" in lines
    assert "no checksum list" in lines


def test_an_interrupted_file_resumes_on_the_next_run_and_finished_ones_are_skipped(server, tmp_path) -> None:
    data = serve_images(server)
    first = fetch(server, tmp_path, names=[GOOD, CUT], retries=0)
    assert statuses(first) == {GOOD: "downloaded", CUT: "failed"}
    assert "connection closed after" in first.of("failed")[0].detail and "kept in" in first.of("failed")[0].detail
    assert not (tmp_path / CUT).exists() and (tmp_path / (CUT + ".part")).stat().st_size == len(data[CUT]) // 2
    second = fetch(server, tmp_path, names=[GOOD, CUT])
    assert statuses(second) == {GOOD: "present", CUT: "downloaded"} and second.ok
    assert server.asked_for(GOOD) == [None]  # not downloaded again
    assert server.asked_for(CUT)[-1] == f"bytes={len(data[CUT]) // 2}-"
    assert (tmp_path / CUT).read_bytes() == data[CUT] and not (tmp_path / (CUT + ".part")).exists()


def test_a_bad_file_under_the_final_name_is_moved_aside_and_replaced(server, tmp_path) -> None:
    data = serve_images(server)
    (tmp_path / GOOD).write_bytes(data[GOOD][: len(data[GOOD]) // 3])  # truncated: does not decode fully
    report = fetch(server, tmp_path, names=[GOOD])
    assert statuses(report) == {GOOD: "downloaded"}
    assert (tmp_path / GOOD).read_bytes() == data[GOOD] and (tmp_path / (GOOD + ".invalid")).exists()


def test_checksums_are_written_once_and_then_enforced(server, tmp_path) -> None:
    data = serve_images(server)
    out, listing = tmp_path / "images", tmp_path / "coco.sha256"
    assert fetch(server, out, names=[GOOD, GOOD2]).ok
    pope.write_checksums(listing, out, [GOOD, GOOD2])
    checksums = pope.read_checksums(listing)
    assert checksums == {n: hashlib.sha256(data[n]).hexdigest() for n in (GOOD, GOOD2)}
    assert subprocess.run(["sha256sum", "-c", str(listing)], cwd=out, capture_output=True).returncode == 0
    (out / GOOD).write_bytes(jpeg(99))  # decodes, but is another image
    server.files[f"/val2014/{GOOD2}"] = jpeg(98)  # the server now serves another image too
    (out / GOOD2).unlink()
    report = fetch(server, out, names=[GOOD, GOOD2], checksums=checksums)
    assert statuses(report) == {GOOD: "downloaded", GOOD2: "corrupt"}
    assert "sha256" in report.of("corrupt")[0].detail and not (out / GOOD2).exists()
    assert (out / GOOD).read_bytes() == data[GOOD]
    assert "sha256 of 2" in report.lines()[-1]
    assert pope.read_checksums(tmp_path / "absent.sha256") == {}


def test_unreachable_server_is_one_error_with_what_to_do_by_hand(tmp_path) -> None:
    url = closed_port_url()
    with pytest.raises(PruneEvalError, match=f"cannot reach {url}/val2014 .*5 POPE image\\(s\\) not downloaded.*val2014.zip.*--check"):
        pope.fetch_images(NAMES, tmp_path, base_url=url + "/val2014", progress=False, **FAST)
    assert not any(tmp_path.iterdir())


def pope_file_for(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "questions"
    folder.mkdir()
    rows = [{"question_id": i + 1, "image": n, "text": "Is there a dog in the image?", "label": "yes"} for i, n in enumerate(names)]
    (folder / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_cli_downloads_reports_and_checks(server, tmp_path) -> None:
    serve_images(server)
    questions = pope_file_for(tmp_path, [GOOD, CUT, MISSING])
    env = {"PRUNE_EVAL_COCO_URL": server.url + "/val2014"}
    args = ["pope-images", "--out", str(tmp_path / "img"), "--questions", str(questions), "--retries", "2", "--timeout", "5"]
    result = run_cli(args, tmp_path, module="prune_eval.assets", env=env, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "3 POPE images in" in result.stdout and "2 downloaded, 1 missing" in result.stdout
    assert f"missing: {MISSING}: HTTP 404" in result.stdout and "1 image(s) not in place; rerun" in result.stderr
    server.files[f"/val2014/{MISSING}"] = jpeg(7)
    again = run_cli([*args, "--write-checksums", "--checksums", str(tmp_path / "list.sha256")], tmp_path, module="prune_eval.assets", env=env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "2 present, 1 downloaded" in again.stdout and "wrote sha256 of 3 images" in again.stdout
    check = run_cli(["pope-images", "--out", str(tmp_path / "img"), "--questions", str(questions), "--check",
                     "--checksums", str(tmp_path / "list.sha256")], tmp_path, module="prune_eval.assets", timeout=60)
    assert check.returncode == 0 and "3 present" in check.stdout and "sha256 of 3" in check.stdout


def test_cli_without_network_is_one_line(tmp_path) -> None:
    questions = pope_file_for(tmp_path, [GOOD])
    result = run_cli(["pope-images", "--out", str(tmp_path / "img"), "--questions", str(questions), "--retries", "0"], tmp_path,
                     module="prune_eval.assets", env={"PRUNE_EVAL_COCO_URL": closed_port_url()}, timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach" in lines[0] and "Download them by hand" in lines[0] and str(tmp_path / "img") in lines[0]


def test_the_shipped_list_is_exactly_popes_500_images(pope_dir) -> None:
    shipped = pope.image_names()
    assert len(shipped) == 500 == len(set(shipped))
    assert shipped == pope.image_names(pope_dir / "llava-1.5") == pope.image_names(pope_dir / "latest")


# ----------------------------------------------------------------------------------------------
# Question files
def serve_questions(server: Server, version: str) -> None:
    for split in SPLITS:
        path = f"/{pope.POPE_COMMITS[version]}/output/coco/coco_pope_{split}.json"
        server.files[path] = (POPE / version / f"coco_pope_{split}.json").read_bytes()


@pytest.mark.parametrize("version", ["llava-1.5", "latest"])
def test_question_files_come_from_the_pinned_commit_and_are_verified(server, tmp_path, version) -> None:
    serve_questions(server, version)
    outcomes = pope.fetch_questions(version, tmp_path, base_url=server.url, **FAST)
    assert [o.status for o in outcomes] == ["downloaded"] * 3
    for split in SPLITS:
        assert hashlib.sha256((tmp_path / f"coco_pope_{split}.json").read_bytes()).hexdigest() == KNOWN_VERSIONS[version][split]
    assert all(path.startswith(f"/{pope.POPE_COMMITS[version]}/output/coco/") for path, _ in server.requests)
    n = len(server.requests)
    assert [o.status for o in pope.fetch_questions(version, tmp_path, base_url=server.url, **FAST)] == ["present"] * 3
    assert len(server.requests) == n


def test_a_question_file_with_another_checksum_is_refused(server, tmp_path) -> None:
    serve_questions(server, "llava-1.5")
    path = f"/{pope.POPE_COMMITS['llava-1.5']}/output/coco/coco_pope_random.json"
    server.files[path] = server.files[path].replace(b"imange", b"image")  # the typo latest fixed
    env = {"PRUNE_EVAL_POPE_URL": server.url}
    result = run_cli(["pope-questions", "--out", str(tmp_path / "q"), "--retries", "0"], tmp_path, module="prune_eval.assets", env=env, timeout=60)
    assert result.returncode == 2
    assert "1 POPE question file(s) not fetched: coco_pope_random.json: sha256" in result.stderr and "POPE llava-1.5 at e3e3926" in result.stderr
    assert sorted(os.listdir(tmp_path / "q")) == ["coco_pope_adversarial.json", "coco_pope_popular.json"]


def test_question_download_without_network_says_what_to_fetch(tmp_path) -> None:
    commit = "e3e39262c85a6a83f26cf5094022a782cb0df58d"
    with pytest.raises(PruneEvalError, match=f"download by hand .*{commit}/output/coco/coco_pope_adversarial.json.*git checkout {commit}"):
        pope.fetch_questions("llava-1.5", tmp_path, base_url=closed_port_url(), **FAST)


# ----------------------------------------------------------------------------------------------
# Weights
def test_only_the_files_evaluation_reads_are_fetched() -> None:
    files = ["config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
             "training_args.bin", "trainer_state.json", "README.md", ".gitattributes"]
    assert weights.needed_files(files) == sorted(files[:8])
    clip = ["config.json", "preprocessor_config.json", "pytorch_model.bin", "model.safetensors", "tf_model.h5", "flax_model.msgpack",
            "tokenizer.json", "vocab.json", "merges.txt"]
    assert weights.needed_files(clip) == ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"]


def assets_cli(args: list[str], tmp_path: Path, **env: str):
    return run_cli(args, tmp_path, module="prune_eval.assets", env={"HF_HOME": str(tmp_path / "hf"), **env}, timeout=120)


def test_weights_for_an_unknown_model_name(tmp_path) -> None:
    result = assets_cli(["weights", "--model", "llava-1.5-7b-orignal"], tmp_path)
    assert result.returncode == 2
    assert "unknown model 'llava-1.5-7b-orignal'; did you mean 'llava-1.5-7b-original'? choices:" in result.stderr
    assert "llava-1.5-13b-original" in result.stderr


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "closed"}], ids=["offline", "closed-port"])
def test_weights_without_network_say_what_to_download_by_hand(tmp_path, env) -> None:
    env = {k: closed_port_url() if v == "closed" else v for k, v in env.items()}
    result = assets_cli(["weights", "--model", "llava-1.5-7b-original"], tmp_path, **env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "liuhaotian/llava-v1.5-7b" in lines[0] and "https://huggingface.co/liuhaotian/llava-v1.5-7b into a folder" in lines[0]
    assert "set model.path=FOLDER" in lines[0]


def fake_cache(hf_home: Path, repo_id: str, commit: str) -> Path:
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_cached_weights_print_path_and_commit(tmp_path) -> None:
    llava = fake_cache(tmp_path / "hf", "liuhaotian/llava-v1.5-7b", "a" * 40)
    clip = fake_cache(tmp_path / "hf", "openai/clip-vit-large-patch14-336", "b" * 40)
    result = assets_cli(["weights", "--model", "llava-1.5-7b-original"], tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert f"liuhaotian/llava-v1.5-7b @ {'a' * 40}: {llava}" in result.stdout
    assert f"openai/clip-vit-large-patch14-336 @ {'b' * 40}: {clip}" in result.stdout


def test_tiny_models_need_no_download(tmp_path) -> None:
    result = assets_cli(["weights", "--model", "tiny"], tmp_path)
    assert result.returncode == 0 and "nothing to download" in result.stdout
