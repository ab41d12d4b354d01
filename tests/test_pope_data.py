"""POPE question files (both formats, both versions, labels by id) and synthetic POPE."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict

import pytest
import torch

from prune_eval.data import pope, synthetic
from prune_eval.errors import PruneEvalError


def test_pinned_version_has_8910_questions(pope_dir) -> None:
    questions, provenance = pope.load_pope(pope_dir / "llava-1.5", version="llava-1.5")
    assert len(questions) == 8910
    assert provenance["counts"] == {"adversarial": 3000, "popular": 3000, "random": 2910}
    assert provenance["sha256"]["random"] == pope.KNOWN_VERSIONS["llava-1.5"]["random"]
    assert len({q.image for q in questions}) == 500
    assert all(q.prompt == q.question + pope.ANSWER_SUFFIX for q in questions)


def test_latest_version_has_9000_questions(pope_dir) -> None:
    questions, provenance = pope.load_pope(pope_dir / "latest", version="latest")
    assert len(questions) == 9000
    assert provenance["counts"]["random"] == 3000


def test_llava_question_file_joins_labels_by_id(pope_dir) -> None:
    by_pope, _ = pope.load_pope(pope_dir / "llava-1.5", version="llava-1.5")
    by_llava, provenance = pope.load_pope(pope_dir / "llava-1.5", version="llava-1.5", llava_question_file=pope_dir / "llava-1.5" / "llava_pope_test.jsonl")
    assert provenance["format"] == "llava"
    assert {q.key: q.label for q in by_llava} == {q.key: q.label for q in by_pope}
    # LLaVA's file orders adversarial, random, popular; the labels still follow the ids
    assert [q.split for q in by_llava][3000] == "random"


def test_version_mismatch_is_an_error(pope_dir) -> None:
    with pytest.raises(PruneEvalError, match="data.version=llava-1.5 but the question files .* are POPE 'latest'"):
        pope.load_pope(pope_dir / "latest", version="llava-1.5")
    with pytest.raises(PruneEvalError, match="different POPE versions"):
        pope.load_pope(pope_dir / "latest", version="latest", llava_question_file=pope_dir / "llava-1.5" / "llava_pope_test.jsonl")


def test_line_order_is_never_used(pope_dir, tmp_path) -> None:
    """Shuffled label files give the same labels per question (LLaVA's eval would mislabel)."""
    folder = tmp_path / "shuffled"
    folder.mkdir()
    for split in pope.SPLITS:
        lines = (pope_dir / "llava-1.5" / f"coco_pope_{split}.json").read_text().splitlines()
        (folder / f"coco_pope_{split}.json").write_text("\n".join(reversed(lines)) + "\n")
    shuffled, _ = pope.load_pope(folder, version="llava-1.5", allow_unknown_version=True,
                                  llava_question_file=pope_dir / "llava-1.5" / "llava_pope_test.jsonl")
    original, _ = pope.load_pope(pope_dir / "llava-1.5", version="llava-1.5")
    assert {q.key: q.label for q in shuffled} == {q.key: q.label for q in original}
    with pytest.raises(PruneEvalError, match="not a known POPE version"):
        pope.load_pope(folder, version="llava-1.5")


def test_missing_and_malformed_files(pope_dir, tmp_path) -> None:
    with pytest.raises(PruneEvalError, match="missing POPE question file"):
        pope.load_pope(tmp_path, version="llava-1.5")
    for split in pope.SPLITS:
        shutil.copy(pope_dir / "llava-1.5" / f"coco_pope_{split}.json", tmp_path)
    with open(tmp_path / "coco_pope_random.json", "a") as f:
        f.write('{"question_id": 9999, "image": "x.jpg", "text": "Is there a cat\n')
    with pytest.raises(PruneEvalError, match=r"coco_pope_random.json:2911: not valid JSON"):
        pope.load_pope(tmp_path, version="llava-1.5", allow_unknown_version=True)


def test_bad_label_is_an_error(tmp_path) -> None:
    for split in pope.SPLITS:
        (tmp_path / f"coco_pope_{split}.json").write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}) + "\n")
    with pytest.raises(PruneEvalError, match="label 'maybe'; allowed: yes, no"):
        pope.load_pope(tmp_path, version="llava-1.5", allow_unknown_version=True)


def test_missing_images_are_counted(pope_dir, tmp_path) -> None:
    questions, _ = pope.load_pope(pope_dir / "llava-1.5", version="llava-1.5")
    for name in sorted({q.image for q in questions})[:10]:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(PruneEvalError, match=r"490 of 500 POPE images missing .*e\.g\. .*COCO_val2014_"):
        pope.check_images(tmp_path, questions)


def test_synthetic_pope_has_popes_structure() -> None:
    questions = synthetic.make_questions(10, seed=3)
    per_image_split = defaultdict(Counter)
    for q in questions:
        per_image_split[(q.image, q.split)][q.label] += 1
    assert len(questions) == 10 * 3 * 6
    assert all(c == Counter({"yes": 3, "no": 3}) for c in per_image_split.values())
    images_by_split = {s: {q.image for q in questions if q.split == s} for s in pope.SPLITS}
    assert images_by_split["random"] == images_by_split["popular"] == images_by_split["adversarial"]
    assert len({q.key for q in questions}) == len(questions)
    for q in questions:  # labels agree with what is drawn
        names = {o.name for o in synthetic.make_scene(*synthetic.parse_image_name(q.image)).objects}
        assert (q.question.removeprefix("Is there a ").removesuffix(" in the image?") in names) == (q.label == "yes")


def test_synthetic_pope_is_deterministic_and_prefix_stable() -> None:
    a = synthetic.make_questions(6, seed=1)
    assert a == synthetic.make_questions(6, seed=1)
    assert synthetic.make_questions(6, seed=2) != a
    image = synthetic.render_image(1, 4)
    assert image.tobytes() == synthetic.render_image(1, 4).tobytes()
    assert image.size[0] != image.size[1]  # non-square, so pad and crop differ


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_images_preprocessed_in_threads_equal_one_batch_in_order(mode, tmp_path, monkeypatch) -> None:
    """load_and_preprocess decodes and preprocesses image by image in threads: the same pixels, in
    the order of the names, as one call over the whole list; a missing file is the loader's error."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from prune_eval.data import images

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    sizes = [(640, 480), (480, 640), (336, 336), (500, 333), (97, 211)] * 3
    names = []
    for i, size in enumerate(sizes):
        synthetic.render_image(3, i).resize(size).save(tmp_path / f"{i}.jpg", quality=90)
        names.append(f"{i}.jpg")
    names = names[::-1]  # not in file order
    load = images.directory_loader(tmp_path)
    monkeypatch.setattr(images, "IMAGE_THREADS", 3)  # threads also on a 2-core machine
    threaded = images.load_and_preprocess(names, load, mode, processor)
    assert torch.equal(threaded, images.preprocess([load(n) for n in names], mode, processor))
    assert threaded.shape == (len(names), 3, 336, 336)
    with pytest.raises(PruneEvalError, match="image not found: .*missing.jpg"):
        images.load_and_preprocess([*names, "missing.jpg"], load, mode, processor)
