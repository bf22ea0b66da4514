#!/usr/bin/env bash
# Copies the results (process 0 writes them, so from worker 0) and the logs to $RESULTS_DIR locally.
#
#   ./tpu_setup/fetch.sh [--dry-run] [REMOTE_PATH ...]     (default: runs/ inside the repository, where experiments write)
set -euo pipefail
source "$(dirname "$0")/env.sh"
parse_common_flags "$@"
paths=("${REST[@]+"${REST[@]}"}")
[[ ${#paths[@]} -gt 0 ]] || paths=("$REMOTE_DIR/runs")
mapfile -t loc < <(tpu_location_flags)
run mkdir -p "$RESULTS_DIR"
for p in "${paths[@]}" jaxattn_logs; do
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$p" "$RESULTS_DIR/" "${loc[@]}" --worker=0
done
echo "copied into $RESULTS_DIR/"
