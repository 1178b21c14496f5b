#!/usr/bin/env bash
# Runs every fuzz target in turn (one at a time: the machine is shared) for SECS seconds each
# and prints one summary line per target: target, seconds, total execs, crashes.
# Usage: ./run_all.sh [SECS] [TARGET...]   (from fuzz/, needs cargo-fuzz and nightly)
# With no TARGET it runs every target `cargo fuzz list` knows (alphabetically: the wire
# targets and app_request, app_reply, app_frame_reader, tls_cert).
set -u
cd "$(dirname "$0")"
secs=${1:-150}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p logs
for t in "${targets[@]}"; do
  start=$(date +%s)
  cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -malloc_limit_mb=1 -print_final_stats=1 >"logs/$t.log" 2>&1
  rc=$?
  end=$(date +%s)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(ls artifacts/"$t" 2>/dev/null | wc -l)
  echo "$t secs=$((end - start)) execs=${execs:-?} crashes=$crashes rc=$rc"
done
