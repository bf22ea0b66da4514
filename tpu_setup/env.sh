# shellcheck shell=bash
# Settings shared by the tpu_setup scripts. Override any of them in the environment (or in tpu_setup/env.local.sh,
# which is sourced last if it exists), e.g.  ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 ./tpu_setup/create.sh
#
# Runtime versions per generation (check Google's "TPU software versions" page before use):
#   v2/v3/v4: tpu-ubuntu2204-base   v5e: v2-alpha-tpuv5-lite   v5p: v2-alpha-tpuv5   v6e: v2-alpha-tpuv6e

: "${PROJECT:=}"                                  # empty: gcloud's configured project
: "${ZONE:=us-east5-b}"
: "${TPU_NAME:=jaxattn-tpu}"
: "${QR_ID:=${TPU_NAME}-qr}"                       # queued-resource id
: "${ACCELERATOR_TYPE:=v6e-8}"                     # v6e-8: one host, 8 chips; v5litepod-16: 4 hosts x 4 chips
: "${RUNTIME_VERSION:=v2-alpha-tpuv6e}"
: "${REPO_URL:=https://github.com/jaxattn/jaxattn.git}"
: "${REPO_REF:=main}"
: "${REMOTE_DIR:=jaxattn}"                          # relative to the remote home directory
: "${REMOTE_VENV:=jaxattn-venv}"                    # relative to the remote home directory
: "${PYTHON_VERSION:=3.12}"                         # jax >= 0.10 needs Python >= 3.11 (TPU images ship 3.10)
: "${RESULTS_DIR:=tpu_results}"                     # local folder fetch.sh copies into
: "${DRY_RUN:=0}"

TPU_SETUP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -f "$TPU_SETUP_DIR/env.local.sh" ]]; then
  # shellcheck disable=SC1091
  source "$TPU_SETUP_DIR/env.local.sh"
fi

# gcloud flags every command takes.
tpu_location_flags() {
  local flags=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && flags+=(--project="$PROJECT")
  printf '%s\n' "${flags[@]}"
}

# Prints a command (shell-quoted) and runs it, or only prints it when DRY_RUN=1.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

# Handles the flags every script accepts; sets REST to the remaining arguments.
parse_common_flags() {
  REST=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      *) REST+=("$1") ;;
    esac
    shift
  done
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Runs a shell command string on every worker of the TPU VM (in parallel, as multi-host JAX needs).
on_all_workers() {
  local loc
  mapfile -t loc < <(tpu_location_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${loc[@]}" --worker=all --command="$1"
}
