#!/usr/bin/env bash
# Deletes the queued resource and its TPU VM (billing stops). Fetch results first (./tpu_setup/fetch.sh).
#
#   ./tpu_setup/delete.sh [--dry-run]
set -euo pipefail
source "$(dirname "$0")/env.sh"
parse_common_flags "$@"
[[ ${#REST[@]} -eq 0 ]] || die "unknown argument ${REST[0]}"
mapfile -t loc < <(tpu_location_flags)
# --force also deletes the node the queued resource created.
run gcloud compute tpus queued-resources delete "$QR_ID" "${loc[@]}" --force --quiet
