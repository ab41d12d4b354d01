#!/usr/bin/env bash
# On the GPU machine: a random LLaVA-1.5-7B-shape checkpoint saved to disk, then
#   quant  - load time / memory / latency for fp16, bf16, int8, nf4 (benchmarks/quant_load.py)
#   cli    - the real CLI path: model.path=<checkpoint>, real POPE questions, stand-in COCO images
# Usage: bash benchmarks/gpu_quant_and_cli.sh quant|cli OUT_DIR QUESTION_DIR
set -euo pipefail
what=$1; out=$2; questions=$3
ckpt=/tmp/llava7b-random; coco=/tmp/coco
[ -f $ckpt/config.json ] || python3 benchmarks/quant_load.py save --out $ckpt
[ -d $coco ] || python3 benchmarks/fake_coco.py --questions "$questions" --out $coco
if [ "$what" = quant ]; then
  for q in fp16 bf16 int8 nf4; do
    python3 benchmarks/quant_load.py measure --checkpoint $ckpt --quant $q --questions "$questions" --images 8 --latency-questions 12 --out "$out/quant-$q.json" 2>&1 | grep -v -i warn | tail -2
  done
else
  started=$(date +%s)
  python3 -m prune_eval -m model=llava-1.5-7b model.path=$ckpt data.question_dir="$questions" data.image_dir=$coco \
    'data.splits=[random]' method=vanilla,visionzip budget=64 eval.fast=true eval.max_new_tokens=8 device=cuda name=real \
    hydra.sweep.dir=/tmp/real 2>&1 | grep -v -i warn | tail -12
  echo "cli sweep wall: $(( $(date +%s) - started )) s"
  cp /tmp/real/report/report.md "$out/real-report.md" 2>/dev/null || true
  python3 -c "import json,glob; print(json.dumps({p: {k: json.load(open(p))[k] for k in ('cell','model','compute','seconds','n_questions')} for p in glob.glob('/tmp/real/*/summary.json')}, indent=1, default=str))" > "$out/real-summaries.json"
fi
