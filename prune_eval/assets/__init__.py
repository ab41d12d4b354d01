"""Real assets, fetched and verified: `python -m prune_eval.assets {pope-questions,pope-images,weights}`.

- `pope.py`: POPE's question files at the pinned commits (sha256-checked) and its 500 COCO val2014 images
  (parallel, resumable, decoded and, once a checksum list is shipped, sha256-checked);
- `weights.py`: the files a `model=` choice needs from the Hugging Face Hub, into its cache;
- `download.py`: the resumable HTTP download behind the first two (`.part` -> check -> rename).

This folder also holds shipped data: `coco_val2014_pope.txt` (the 500 image names),
`coco_val2014_pope.sha256` (once generated) and `toy/` (the trained toy model). Docs: docs/assets.md.
"""
