#!/usr/bin/env bash
# Creates the TPU VM through a queued resource and waits until it is ACTIVE.
#
#   ./tpu_setup/create.sh [--spot | --best-effort] [--no-wait] [--dry-run]
#
# --spot: preemptible capacity (much cheaper; the VM can be reclaimed at any time; experiments resume from their
#   checkpoints when rerun). --best-effort: the older preemptible queue. --dry-run prints the gcloud commands.
set -euo pipefail
source "$(dirname "$0")/env.sh"
parse_common_flags "$@"
capacity=()
wait_active=1
for arg in "${REST[@]+"${REST[@]}"}"; do
  case "$arg" in
    --spot) capacity=(--spot) ;;
    --best-effort) capacity=(--best-effort) ;;
    --no-wait) wait_active=0 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done
mapfile -t loc < <(tpu_location_flags)

run gcloud compute tpus queued-resources create "$QR_ID" "${loc[@]}" \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
  "${capacity[@]+"${capacity[@]}"}"

[[ "$wait_active" == 1 ]] || exit 0
describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${loc[@]}" --format='value(state.state)')
if [[ "$DRY_RUN" == 1 ]]; then
  run "${describe[@]}"
  echo "(dry run: would poll the state every 30 s until ACTIVE)"
  exit 0
fi
echo "waiting for $QR_ID to become ACTIVE (WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE) ..."
while true; do
  state="$("${describe[@]}")"
  echo "$(date +%H:%M:%S) $state"
  case "$state" in
    ACTIVE) break ;;
    FAILED|SUSPENDED) die "queued resource $QR_ID is $state; delete it (./tpu_setup/delete.sh) before retrying" ;;
  esac
  sleep 30
done
echo "TPU VM $TPU_NAME is ACTIVE. Next: ./tpu_setup/install.sh"
