#!/usr/bin/env bash
# Render every clip in a folder, the way a pipeline would: NDJSON events on
# stdout (one object per line), exit codes for control flow, and resume for
# jobs that were stopped.
#
#   examples/batch.sh INPUT_DIR OUTPUT_DIR
#
# Needs jq. Exit codes: 0 done, 1 failed, 2 bad input, 75 resumable,
# 130 Ctrl-C, 143 SIGTERM.
set -uo pipefail
in_dir=${1:?usage: batch.sh INPUT_DIR OUTPUT_DIR}
out_dir=${2:?usage: batch.sh INPUT_DIR OUTPUT_DIR}
mkdir -p "$out_dir"

for clip in "$in_dir"/*.mp4; do
    out="$out_dir/$(basename "${clip%.*}")-x2.mp4"
    events=$(mktemp)
    clipexport render "$clip" -o "$out" --scale 2 --json >"$events"
    code=$?
    job=$(jq -r 'select(.type == "plan") | .job' "$events" | head -n 1)
    case $code in
        0)  echo "done: $(jq -r 'select(.type == "done") | .output' "$events")" ;;
        2)  echo "skipped $clip: bad input (see the message above)" ;;
        75) echo "stopped, resuming $job"; clipexport resume "$job" --json >/dev/null ;;
        130|143) echo "interrupted; resume later with: clipexport resume $job"; rm -f "$events"; exit "$code" ;;
        *)  echo "failed: $(jq -r 'select(.type == "error") | .message' "$events")" ;;
    esac
    rm -f "$events"
done
