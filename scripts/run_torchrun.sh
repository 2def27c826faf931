#!/usr/bin/env bash
# Run the distributed suite under torchrun: one pytest per rank, with the dtensor_attn plugin in
# torchrun mode (one process group per session, ranks agree on every test's outcome, per-rank
# logs and JUnit XML in one folder), then the run-level JUnit file for CI (OUT/junit.xml, written
# after torchrun exits, so it also covers ranks that were killed) and a per-rank summary.
#
# usage: scripts/run_torchrun.sh [-n NPROC] [--backend gloo|nccl] [--timeout S] [--out DIR]
#            [--run-timeout S] [--nnodes N --node-rank R --rdzv-endpoint HOST:PORT
#            --rdzv-id ID --rdzv-backend B ...] [-- PYTEST_ARGS...]
#
#   -n NPROC        ranks on this node; default: one per GPU with NCCL, else 4 CPU ranks (gloo)
#   --backend B     gloo or nccl; default: nccl if there is a GPU, else gloo
#   --timeout S     limit of each test phase and of each wait for the other ranks (default 120)
#   --out DIR       junit.xml (the run, for CI), rank<r>.log, rank<r>.xml and console.log go
#                   here (default out/torchrun)
#   --run-timeout S wall-clock limit of the whole run (default 10800)
#   --dry-run       print the torchrun command and exit
#   PYTEST_ARGS     default: tests/distributed
#
# One node: rendezvous on a free port (torchrun --standalone), never a fixed one. Several nodes:
# run the same command on every node with torchrun's --nnodes, --node-rank, --rdzv-endpoint and
# --rdzv-id. Exits non-zero if any rank failed or no test ran; no process of the run is left.
set -uo pipefail

PYTHON=${PYTHON:-python3}
nproc=""
backend=""
phase_timeout=""
out="out/torchrun"
run_timeout=10800
torchrun_args=()
multinode=0
dry_run=0
pytest_args=()

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

value_options=" -n --nproc-per-node --nproc_per_node --backend --timeout --out --run-timeout "
forwarded=" --nnodes --node-rank --node_rank --rdzv-endpoint --rdzv_endpoint --rdzv-id --rdzv_id \
--rdzv-backend --rdzv_backend --rdzv-conf --rdzv_conf --local-addr --local_addr "
while (($#)); do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --) shift; pytest_args=("$@"); break ;;
  esac
  if [[ $value_options != *" $1 "* && $forwarded != *" $1 "* ]]; then
    echo "run_torchrun.sh: unknown option $1 (see --help); pytest arguments go after --" >&2
    exit 2
  fi
  if (($# < 2)); then
    echo "run_torchrun.sh: $1 needs a value (see --help)" >&2; exit 2
  fi
  case "$1" in
    -n|--nproc-per-node|--nproc_per_node) nproc=$2 ;;
    --backend) backend=$2 ;;
    --timeout) phase_timeout=$2 ;;
    --out) out=$2 ;;
    --run-timeout) run_timeout=$2 ;;
    *)  # torchrun's own multi-node flags
      torchrun_args+=("$1" "$2")
      if [[ ($1 == --nnodes && $2 != 1 && $2 != 1:1) || $1 == --rdzv[-_]endpoint ]]; then
        multinode=1  # rendezvous through the given endpoint instead of --standalone
      fi ;;
  esac
  shift 2
done

case "$backend" in ""|gloo|nccl) ;; *) echo "run_torchrun.sh: --backend must be gloo or nccl" >&2; exit 2 ;; esac
if [[ -z $backend || ( -z $nproc && $backend == nccl ) ]]; then
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') || exit 2
  [[ -n $backend ]] || backend=$([[ $gpus -gt 0 ]] && echo nccl || echo gloo)
fi
if [[ -z $nproc ]]; then
  if [[ $backend == nccl ]]; then nproc=$gpus; else nproc=4; fi
fi
if ((multinode)); then
  [[ " ${torchrun_args[*]} " == *" --rdzv-backend "* || " ${torchrun_args[*]} " == *" --rdzv_backend "* ]] \
    || torchrun_args+=(--rdzv-backend c10d)
else
  torchrun_args+=(--standalone)
fi
((${#pytest_args[@]})) || pytest_args=(tests/distributed)

out=$(realpath -m "$out")
plugin_args=(--dtensor-mode torchrun --dtensor-backend "$backend" --dtensor-out "$out")
[[ -n $phase_timeout ]] && plugin_args+=(--dtensor-timeout "$phase_timeout")
cmd=("$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" --nproc-per-node "$nproc"
     -m pytest -p no:cacheprovider "${plugin_args[@]}" "${pytest_args[@]}")
echo "run_torchrun.sh: $nproc ranks, $backend; ${cmd[*]}"
((dry_run)) && exit 0

mkdir -p "$out" || exit 2
rm -f "$out"/rank*.log "$out"/rank*.xml "$out"/rank*.xml.tmp "$out"/rank*.collected.txt \
  "$out"/junit.xml "$out"/junit.xml.tmp "$out"/console.log

# Every process of this run inherits this tag; at exit, any still alive is stopped by its pid.
tag=${DTENSOR_ATTN_RUN_TAG:-dtensor_attn-$$-$RANDOM$RANDOM}
export DTENSOR_ATTN_RUN_TAG=$tag

leftovers() {  # pids whose environment carries the tag (bash builtins only: no forks to match)
  local dir pid kv
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue  # this script, this $(subshell)
    { while IFS= read -r -d '' kv; do
        if [[ $kv == "DTENSOR_ATTN_RUN_TAG=$tag" ]]; then echo "$pid"; break; fi
      done < "$dir/environ"; } 2>/dev/null
  done
}

sweep() {
  local pids
  pids=$(leftovers)
  [[ -z $pids ]] && return 0
  echo "run_torchrun.sh: stopping leftover processes of this run: $(echo $pids)" >&2
  kill -TERM $pids 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    sleep 0.5
    pids=$(leftovers)
    [[ -z $pids ]] && return 0
  done
  kill -KILL $pids 2>/dev/null
}
trap sweep EXIT
# Ctrl-C or a TERM to this script stops every process of the run (the workers of torchrun run
# in sessions of their own, out of reach of the terminal's signals).
trap 'echo "run_torchrun.sh: interrupted" >&2; sweep' INT TERM

# In the background so that the traps above run at once rather than after the run.
(
  timeout --kill-after=30 "$run_timeout" "${cmd[@]}" 2>&1 | tee "$out/console.log"
  exit "${PIPESTATUS[0]}"
) &
child=$!
wait "$child"
rc=$?
while kill -0 "$child" 2>/dev/null; do  # wait returned for a trapped signal: wait again
  wait "$child"
  rc=$?
done
note=""
if ((rc == 124 || rc == 137)); then
  note="the run exceeded --run-timeout $run_timeout s and was stopped"
  echo "run_torchrun.sh: $note" >&2
fi

testing="$(dirname "$0")/../dtensor_attn/testing/harness"
node_args=()
((multinode)) && node_args+=(--this-node-only)  # each node reports its own ranks
"$PYTHON" "$testing/run_junit.py" "$out" "${node_args[@]}" --note "$note" || { ((rc)) || rc=1; }
"$PYTHON" "$testing/summary.py" "$out" "${node_args[@]}"
summary_rc=$?
if ((rc == 0 && summary_rc != 0)); then rc=$summary_rc; fi
echo "run_torchrun.sh: exit status $rc (CI reads $out/junit.xml; per-rank logs, JUnit XML and" \
  "console.log there too)"
exit "$rc"
