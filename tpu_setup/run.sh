#!/usr/bin/env bash
# Runs one command on every worker at once (multi-host JAX needs all of them), inside the repository with the
# virtual environment active; output goes to the terminal and to ~/jaxattn_logs/<name>.log on each worker.
# Experiments given --distributed call jax.distributed.initialize() first.
#
#   ./tpu_setup/run.sh [--name NAME] [--background] [--dry-run] -- python -m experiments mqar --preset gpu --distributed
#
# --background: start with nohup and return at once (follow with ./tpu_setup/run.sh -- tail -f ~/jaxattn_logs/NAME.log).
set -euo pipefail
source "$(dirname "$0")/env.sh"
name="run-$(date +%Y%m%d-%H%M%S)"
background=0
cmd=()
args=("$@")
i=0
while [[ $i -lt ${#args[@]} ]]; do
  case "${args[$i]}" in
    --dry-run) DRY_RUN=1 ;;
    --background) background=1 ;;
    --name) i=$((i + 1)); name="${args[$i]:-}" ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    --) cmd=("${args[@]:$((i + 1))}"); break ;;
    *) die "unknown argument ${args[$i]} (put the command after --)" ;;
  esac
  i=$((i + 1))
done
[[ ${#cmd[@]} -gt 0 ]] || die "no command given (usage: run.sh [--name NAME] [--background] -- COMMAND ...)"
quoted="$(printf '%q ' "${cmd[@]}")"
inner="set -o pipefail; cd ~/$REMOTE_DIR && . ~/$REMOTE_VENV/bin/activate && mkdir -p ~/jaxattn_logs && "
if [[ "$background" == 1 ]]; then
  inner+="nohup $quoted> ~/jaxattn_logs/$name.log 2>&1 < /dev/null & echo started $name on \$(hostname)"
else
  inner+="${quoted}2>&1 | tee ~/jaxattn_logs/$name.log"
fi
on_all_workers "$inner"
