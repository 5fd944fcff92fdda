#!/usr/bin/env bash
# One kernel of a compiled decode step under Nsight Compute (GPU machine, ncu on PATH): where its time
# goes (speed of light, launch and occupancy, warp stalls, memory) and its per-instruction source
# counters, for the first launch inside profile_step.py's "prof" range (caches flushed, clocks not
# locked: a diagnostic, not a timing to compare with CUDA-graph replays).
#
#   bash benchmarks/ncu_kernel.sh OUT_DIR KERNEL [profile_step.py options...]
#   bash benchmarks/ncu_kernel.sh out _pick_kernel --config quest --batch 8 --heads 32/8 --budget 2048 --context 32768
#
# Writes OUT_DIR/KERNEL.ncu-rep, KERNEL_details.csv (every section's metrics) and KERNEL_sass.csv.gz
# (instructions executed and warp-stall samples per SASS line).
set -euo pipefail
out=$(realpath -m "$1") kernel=$2
shift 2
mkdir -p "$out"
ncu --clock-control none --nvtx --nvtx-include "prof/" -k "regex:$kernel" -c 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
    -f -o "$out/$kernel" python benchmarks/profile_step.py --plain --steps 4 "$@"
ncu -i "$out/$kernel.ncu-rep" --page details --csv > "$out/${kernel}_details.csv"
ncu -i "$out/$kernel.ncu-rep" --page source --print-source sass --csv | gzip > "$out/${kernel}_sass.csv.gz"
