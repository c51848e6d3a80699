#!/usr/bin/env bash
# Runs the worker end to end on the embedded SQLite default, with no server to install:
# pushes sample jobs into all three queues (lowest priority first), runs them, and shows
# that they ran in priority order. Everything lives in a scratch directory that is removed
# at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet
bin="$PWD/target/debug/pim-job-queue"
scratch="$(mktemp -d -t pim-job-queue-demo.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT

# The job command is an argv array: no shell is involved, placeholders are filled per job.
cat > "$scratch/worker.toml" <<TOML
poll_interval = "200ms"
[job]
command = ["/bin/echo", "ran {code} from {queue} as job {id}, file={payload.file}"]
TOML
export PIM_JOB_QUEUE_CONFIG="$scratch/worker.toml"
# No database_url: the default SQLite file is used. Under systemd it lives in the unit's
# state directory; the demo points that directory at the scratch space.
export STATE_DIRECTORY="$scratch/state"

echo "== pushing two jobs per queue, lowest priority first"
for queue in data_maintenance_job import_export_job ui_job; do
  for n in 1 2; do
    id=$("$bin" push "$queue" "sample_${queue%_job}_$n" --payload "{\"file\": \"$queue-$n.csv\"}")
    echo "pushed job $id to $queue"
  done
done

echo
"$bin" status

echo
echo "== consuming (stops after 6 jobs): ui_job first, then import_export_job, then data_maintenance_job"
"$bin" consume --limit 6

echo
"$bin" jobs
