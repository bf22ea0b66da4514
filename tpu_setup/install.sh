#!/usr/bin/env bash
# Installs jaxattn with jax[tpu] on every worker: a Python >= 3.11 virtual environment (uv), the repository (git
# clone of REPO_URL at REPO_REF, or --local: a tarball of this checkout's tracked files), then check_tpu.py.
#
#   ./tpu_setup/install.sh [--local] [--dry-run]
set -euo pipefail
source "$(dirname "$0")/env.sh"
parse_common_flags "$@"
source_mode=git
for arg in "${REST[@]+"${REST[@]}"}"; do
  case "$arg" in
    --local) source_mode=local ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done
mapfile -t loc < <(tpu_location_flags)

if [[ "$source_mode" == local ]]; then
  repo_root="$(cd "$TPU_SETUP_DIR/.." && pwd)"
  tarball="$(mktemp -d)/jaxattn.tar.gz"
  run git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxattn.tar.gz" "${loc[@]}" --worker=all
  fetch="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jaxattn.tar.gz -C ~/$REMOTE_DIR"
else
  fetch="if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch -q origin; else git clone -q $REPO_URL ~/$REMOTE_DIR; fi && git -C ~/$REMOTE_DIR checkout -q $REPO_REF"
fi

on_all_workers "set -euo pipefail
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH=\$HOME/.local/bin:\$PATH
$fetch
uv venv -q --allow-existing --python $PYTHON_VERSION ~/$REMOTE_VENV
. ~/$REMOTE_VENV/bin/activate
uv pip install -q -U 'jax[tpu]'
uv pip install -q -e ~/$REMOTE_DIR'[experiments]'
cd ~/$REMOTE_DIR && python tpu_setup/check_tpu.py"
echo "installed. Next: ./tpu_setup/run.sh -- python -m experiments mqar --preset gpu --distributed"
