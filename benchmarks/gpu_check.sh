#!/usr/bin/env bash
# make gpu-check: what needs CUDA, on one GPU, into one results folder, in under 8 minutes (README "GPU check").
#
#   gpu              the card (nvidia-smi's line), torch, CUDA and DeepSpeed          gpu.log
#   tests            pytest -m gpu: the tests that need CUDA                          tests.log, tests.xml
#   demo             make demo's job at NPROC=1 (deepspeed --num_gpus 1)              demo/, demo.log
#   inference        make bench's GPU column: the exported student, MoE vs dense      inference.*
#   distill_step     the distillation step, MoE vs its projected dense twin           distill_step.*
#   authors_step     ours vs the authors' step                                        authors_step.*
#   teacher_scaling  teachers from 22M to the largest random BERT that fits           teacher_scaling/
#
# into runs/gpu-check/<UTC time>/ (GPU_CHECK_OUT: another root), with summary.md: each step's status, seconds
# and time limit. Each step runs under `timeout`; the limits add up to under 8 minutes. A step that fails or
# runs out of time is recorded and the next one runs; the exit status is 1 if any did.
#
# Without CUDA it runs nothing: it checks that every step would resolve (its script is there, the
# benchmarks' flags pass their --check, the demo's pass --dry_run, pytest's gpu selection holds at least
# MIN_GPU_TESTS tests), prints one line saying so and exits 0; a step that does not resolve: one line
# naming it, exit 2. CI runs this mode (tests/test_gpu.py). GPU_CHECK_EXTRA_FLAGS: words appended to every
# benchmark's flags (how that test breaks a step on purpose).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${GPU_CHECK_OUT:-runs/gpu-check}/$(date -u +%Y%m%dT%H%M%SZ)"
read -r -a EXTRA <<< "${GPU_CHECK_EXTRA_FLAGS:-}"
MIN_GPU_TESTS=6   # tests/test_gpu.py's: fewer selected means the marker or the selection broke
BUDGET_S=480      # 8 minutes, the issue's
KILL_AFTER_S=3    # a step still alive this long after its limit's SIGTERM gets SIGKILL

STEPS=(gpu tests demo inference distill_step authors_step teacher_scaling)
# Seconds. The tests' first CUDA run builds DeepSpeed's FusedAdam kernel (nvcc; cached for the later steps).
declare -A LIMIT_S=([gpu]=10 [tests]=195 [demo]=45 [inference]=25 [distill_step]=50 [authors_step]=45
                    [teacher_scaling]=75)
DEMO=(launchers/distill.py --ep_size 1 --teacher_placement zero3 --micro_batch_size 32 --output_dir "$OUT/demo")
INFERENCE=(benchmarks/inference.py --device cuda --experts "4,8" --out "$OUT/inference.json")
DISTILL_STEP=(benchmarks/distill_step.py --device cuda --experts "1p,4" --out "$OUT/distill_step.json")
AUTHORS_STEP=(benchmarks/authors_step.py --device cuda --out "$OUT/authors_step.json")
# 22M to 1.3B, each whole on the GPU (a teacher that would not fit is skipped, saying so), one process
TEACHER_SCALING=(benchmarks/teacher_scaling.py --device cuda --teachers "minilm,bert-large,bert-1.3b"
                 --max_procs 1 --placements replicated --quick --quiet_wait_s 0 --out "$OUT/teacher_scaling")
declare -A SCRIPT=([tests]=tests/test_gpu.py [demo]="${DEMO[0]}" [inference]="${INFERENCE[0]}"
                   [distill_step]="${DISTILL_STEP[0]}" [authors_step]="${AUTHORS_STEP[0]}"
                   [teacher_scaling]="${TEACHER_SCALING[0]}")
GPU_INFO='
import shutil, subprocess, torch, deepspeed
smi = shutil.which("nvidia-smi")
print(subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if smi else "nvidia-smi: not on PATH")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, deepspeed {deepspeed.__version__}, "
      f"{torch.cuda.device_count()} GPU(s), device 0: {torch.cuda.get_device_name(0)}")'

unresolved() {  # step, why
    echo "gpu-check: step $1 does not resolve: $2"
    exit 2
}

total=0
for step in "${STEPS[@]}"; do
    total=$((total + LIMIT_S[$step] + KILL_AFTER_S))
done
((total <= BUDGET_S)) || unresolved "limits" "they add up to ${total} s, over the ${BUDGET_S} s budget"

# ------------------------------------------------------------------------------------ without CUDA
if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    LOG=$(mktemp)
    trap 'rm -f "$LOG"' EXIT
    resolve() {  # step, command...: it must exit 0; its last line names the failure if not
        local step=$1
        shift
        "$@" > "$LOG" 2>&1 || unresolved "$step" "$(grep -v '^[[:space:]]*$' "$LOG" | tail -n 1)"
    }
    for step in "${!SCRIPT[@]}"; do
        [[ -f ${SCRIPT[$step]} ]] || unresolved "$step" "${SCRIPT[$step]} is missing"
    done
    resolve inference python "${INFERENCE[@]}" "${EXTRA[@]}" --check
    resolve distill_step python "${DISTILL_STEP[@]}" "${EXTRA[@]}" --check
    resolve authors_step python "${AUTHORS_STEP[@]}" "${EXTRA[@]}" --check
    resolve teacher_scaling python "${TEACHER_SCALING[@]}" "${EXTRA[@]}" --check
    resolve demo env DS_ACCELERATOR=cpu python "${DEMO[@]}" --dry_run True
    resolve tests python -m pytest --collect-only -q -p no:cacheprovider -m gpu tests
    selected=$(grep -c '::' "$LOG" || true)
    ((selected >= MIN_GPU_TESTS)) ||
        unresolved tests "pytest -m gpu selects ${selected} tests, expected at least ${MIN_GPU_TESTS}"
    echo "gpu-check: no CUDA device here (torch.cuda.is_available() is False); checked that its ${#STEPS[@]}" \
         "steps resolve: ${STEPS[*]} (the scripts are there, the benchmarks' flags pass --check, the demo's" \
         "--dry_run, pytest -m gpu selects ${selected} tests; limits ${total} s of ${BUDGET_S}); ran nothing"
    exit 0
fi

# ------------------------------------------------------------------------------------ with CUDA
mkdir -p "$OUT"
ROWS=()
FAILED=()
run() {  # step, command...: under its time limit, output in $OUT/<step>.log
    local step=$1 limit=${LIMIT_S[$1]} start=$SECONDS rc=0 status=ok
    shift
    echo "gpu-check: $step (limit ${limit} s) ..."
    timeout -k "$KILL_AFTER_S" "$limit" "$@" > "$OUT/$step.log" 2>&1 || rc=$?
    if ((rc == 124 || rc == 137)); then
        status="out of time"
    elif ((rc != 0)); then
        status="failed (exit $rc)"
    fi
    ((rc == 0)) || FAILED+=("$step")
    ROWS+=("| $step | $status | $((SECONDS - start)) | $limit | $step.log |")
    echo "gpu-check: $step: $status in $((SECONDS - start)) s"
}
run gpu python -c "$GPU_INFO"
run tests python -m pytest -m gpu tests -q -p no:cacheprovider --junitxml "$OUT/tests.xml"
run demo env DS_ACCELERATOR=cuda deepspeed --num_gpus 1 "${DEMO[@]}"
run inference python "${INFERENCE[@]}" "${EXTRA[@]}"
run distill_step python "${DISTILL_STEP[@]}" "${EXTRA[@]}"
run authors_step python "${AUTHORS_STEP[@]}" "${EXTRA[@]}"
run teacher_scaling python "${TEACHER_SCALING[@]}" "${EXTRA[@]}"

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    cat "$OUT/gpu.log"
    echo
    echo "$((${#STEPS[@]} - ${#FAILED[@]})) of ${#STEPS[@]} steps ok in ${SECONDS} s (budget ${BUDGET_S} s)."
    echo
    echo "| step | status | seconds | limit | log |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} > "$OUT/summary.md"
echo "gpu-check: $((${#STEPS[@]} - ${#FAILED[@]})) of ${#STEPS[@]} steps ok in ${SECONDS} s; results in $OUT" \
     "(summary.md)${FAILED[*]:+; failed: ${FAILED[*]}}"
((${#FAILED[@]} == 0)) || exit 1
