#!/usr/bin/env bash
# The embedded pipeline end to end: SFT -> reward model -> P3O -> before/after report.
# Usage: scripts/demo.sh [lit-p3o executable]   (make demo passes the venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
LIT=${1:-lit-p3o}
start=$(date +%s)
"$LIT" fit --config configs/demo/sft.yaml
"$LIT" fit --config configs/demo/reward.yaml
"$LIT" fit --config configs/demo/p3o.yaml
"$LIT" report --reference outputs/demo/sft --policy outputs/demo/p3o --judge outputs/demo/reward \
  --frontier outputs/demo/logs/p3o/demo/frontier.csv --out outputs/demo/p3o_training.png
echo "[lit-p3o] demo finished in $(( $(date +%s) - start )) s; models and plots are under outputs/demo/"
