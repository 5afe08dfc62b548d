#!/usr/bin/env bash
# GPU readiness check: run ON a lent GPU machine (one H100/H200, CPython 3.12 with CUDA torch
# preinstalled, no network), from the repository root, with wheels/gpu-py312 carried along
# (benchmarks/gpu_wheels.sh fills it). It installs hybridfc offline, then runs what needs a
# device, and writes ONE report: $OUT/gpu_report.md, or runs/gpu_report.md without $OUT.
#
#   1. install   a venv over the machine's python (its CUDA torch stays; pip never sees a torch
#                wheel), the wheels, then hybridfc editable (PYTHONPATH holds the repo either way)
#   2. device    nvidia-smi; python, torch, CUDA, cuDNN, NCCL and package versions
#   3. tests     tests/test_cuda.py: the head, selections, optimizer and collectives on CUDA/NCCL
#   4. train     examples/train.py through the deepspeed launcher, 1 GPU, fp16 then bf16
#   5. bench     bench_head_step.py (store, recompute, naive at 2M classes) and bench_selection.py with
#                --device cuda (their GPU presets)
#
# A step that fails or runs out of time is recorded (status, seconds, its output's tail) and the
# next one runs. The whole run stays under 5 minutes: each step gets its own cap, and never more
# than what is left of the budget; a step with less than MIN_STEP_S left is skipped. The report is
# rewritten after every step, so a run killed from outside still leaves one.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: installs nothing (checks offline that the
#       wheels resolve for 3.12), runs every step with $PYTHON (default .venv/bin/python); the
#       steps that need CUDA fail fast without one, which exercises the report
set -u
cd "$(dirname "$0")/.."

BUDGET_S=285
MIN_STEP_S=15
export WHEELS=wheels/gpu-py312
export DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--dry-run]" >&2
    exit 2
fi

REPORT_DIR=${OUT:-runs}
REPORT=$REPORT_DIR/gpu_report.md
mkdir -p "$REPORT_DIR"
export LOGS
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # full outputs; the report keeps their tails
trap 'rm -rf "$LOGS"' EXIT
export VENV=${TMPDIR:-/tmp}/hybridfc-gpu-venv
if (( DRY_RUN )); then
    export PY=${PYTHON:-.venv/bin/python}
else
    BASE_PY=${PYTHON:-$(command -v python3 || command -v python)}
    export BASE_PY
    export PY=$VENV/bin/python
fi
# The repo's own hybridfc, whether or not the editable install works.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# pip sees the wheel folder and nothing else: no configured index, find-links or constraints.
unset "${!PIP_@}"
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
STARTED=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
DEADLINE=$((SECONDS + BUDGET_S))
TITLES=() STATUSES=() DURATIONS=()

# ----------------------------------------------------------------------------- steps
# Each runs in its own bash under `timeout`: it echoes what it runs, and fails with a message.

# make_venv: $VENV over the machine's python. --without-pip needs no ensurepip; the .pth adds the
# machine's site directories after the venv's own, as --system-site-packages does (also where that
# python is itself a venv). Where no venv can be made, $VENV/bin/python is the machine's python.
make_venv() {
    if "$BASE_PY" -m venv --without-pip "$VENV"; then
        local site
        site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$BASE_PY" -c 'import sys; print("\n".join(f"import site; site.addsitedir({p!r})" for p in sys.path
                                                 if p.endswith(("site-packages", "dist-packages"))))' \
            >"$site/_machine_site.pth"
        echo "venv $VENV over the machine's python:"
        cat "$site/_machine_site.pth"
    else
        echo "no venv: the wheels go into the machine's python itself"
        rm -rf "$VENV" && mkdir -p "$VENV/bin" && ln -s "$BASE_PY" "$PY"
    fi
}

step_install() {
    local requirements=$WHEELS/requirements.txt pip_wheel
    pip_wheel=$(ls "$WHEELS"/pip-*.whl 2>/dev/null | head -n 1)
    [[ -f "$requirements" && -n "$pip_wheel" ]] || { echo "no wheel set in $WHEELS: run benchmarks/gpu_wheels.sh"; return 1; }
    if (( DRY_RUN )); then
        echo "dry run: nothing installed; the steps use $PY as it is"
        echo "\$ pip install --dry-run (CPython 3.12 manylinux, offline) -r $requirements"
        "$PY" -m pip install --quiet --dry-run --ignore-installed --no-index --find-links "$WHEELS" \
            --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --target "$LOGS/resolve" -r "$requirements" \
            --report "$LOGS/resolve.json" || return 1
        "$PY" - "$LOGS/resolve.json" <<'PY'
import json, sys
chosen = json.load(open(sys.argv[1]))["install"]
print("resolves offline:", " ".join(sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in chosen)))
PY
        return 0
    fi
    echo "\$ $BASE_PY: $("$BASE_PY" -c 'import sys; print(sys.version)')"
    "$BASE_PY" -c 'import torch' || { echo "no torch in $BASE_PY: set PYTHON to the python that has it"; return 1; }
    [[ -x "$PY" ]] || make_venv
    local offline=(--no-index --find-links "$WHEELS")
    echo "\$ pip install ${offline[*]} -r $requirements"
    # pip run from its wheel the first time: the machine's python may have none. The set holds
    # pip, so afterwards "python -m pip" works (the venv's, or the machine's where it has one).
    "$PY" "$pip_wheel/pip" install --quiet "${offline[@]}" -r "$requirements" || return 1
    echo "\$ pip install --no-deps deepspeed"
    "$PY" -m pip install --quiet "${offline[@]}" --no-deps "$WHEELS"/deepspeed-*.whl || return 1
    echo "\$ pip install --no-deps --no-build-isolation -e ."
    "$PY" -m pip install --quiet "${offline[@]}" --no-deps --no-build-isolation -e . \
        || echo "editable install failed: hybridfc is imported from PYTHONPATH=$PWD"
    "$PY" - <<'PY'
import torch, deepspeed, hybridfc, faiss, pydantic, pytest
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) from {torch.__file__}")
print(f"deepspeed {deepspeed.__version__}, hybridfc {hybridfc.__version__} from {hybridfc.__file__}")
if torch.version.cuda is None:
    raise SystemExit("the torch found is not a CUDA build")
PY
}

step_device() {
    echo "\$ nvidia-smi"
    nvidia-smi || echo "(nvidia-smi failed)"
    "$PY" - <<'PY'
import platform, sys
import torch

print(f"python {sys.version.split()[0]} on {platform.platform()}")
print(f"torch {torch.__version__}, built with CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for name in ("deepspeed", "hybridfc", "numpy", "faiss", "pydantic"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 - report whatever keeps it from importing
        print(f"{name}: not importable ({exc})")
if not torch.cuda.is_available():
    raise SystemExit("torch.cuda.is_available() is False")
props = torch.cuda.get_device_properties(0)
nccl = torch.cuda.nccl.version()
print(f"{torch.cuda.device_count()} device(s); 0: {props.name}, sm_{props.major}{props.minor}, "
      f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs")
print(f"NCCL {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}; bf16 "
      f"{torch.cuda.is_bf16_supported()}; TF32 matmul by default {torch.backends.cuda.matmul.allow_tf32}")
PY
}

require_cuda() {
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: step not run")'
}

step_tests() {
    require_cuda || return 1
    echo "\$ python -m pytest tests/test_cuda.py"
    "$PY" -m pytest tests/test_cuda.py -q -rs --tb=short -p no:cacheprovider --durations=5
}

# step_train fp16|bf16 PORT: a few hundred steps (10k classes, 160k samples, batch 1024, 2 epochs).
step_train() {
    require_cuda || return 1
    local precision=$1 port=$2 result=$LOGS/train_$1.json
    echo "\$ deepspeed --num_gpus 1 examples/train.py --deepspeed_config ds_configs/gpu_$precision.json --epochs 2"
    "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$port" examples/train.py \
        --deepspeed_config "ds_configs/gpu_$precision.json" --epochs 2 --result-json "$result" || return 1
    echo "steps DeepSpeed skipped (fp16 overflow): $(grep -c 'OVERFLOW' "$LOGS/current.log")"
    echo "result: $(cat "$result")"
}

# step_bench SCRIPT: the benchmark's GPU preset.
step_bench() {
    require_cuda || return 1
    echo "\$ python benchmarks/$1 --device cuda"
    "$PY" "benchmarks/$1" --device cuda
}

export -f make_venv step_install step_device require_cuda step_tests step_train step_bench

# ----------------------------------------------------------------------------- the report
section_of() { echo "$LOGS/section_$1.md"; }

write_report() {
    local i
    {
        echo "# hybridfc GPU check"
        echo
        echo "- started $STARTED on ${HOSTNAME:-$(uname -n)}; $((SECONDS)) s of the ${BUDGET_S} s budget used"
        echo "- mode: $( ((DRY_RUN)) && echo "dry run, nothing installed" || echo "GPU machine"); python \`$PY\`"
        echo "- code: $(git rev-parse --short HEAD 2>/dev/null || echo "no git") $(git status --porcelain 2>/dev/null | grep -q . && echo "+ uncommitted changes")"
        echo
        echo "| # | step | status | seconds |"
        echo "|---|---|---|---|"
        for i in "${!TITLES[@]}"; do
            echo "| $((i + 1)) | ${TITLES[i]} | ${STATUSES[i]} | ${DURATIONS[i]} |"
        done
        for i in "${!TITLES[@]}"; do
            echo
            cat "$(section_of "$i")"
        done
    } >"$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
}

# run_step TITLE CAP_S TAIL_LINES COMMAND...: COMMAND in bash under `timeout` (CAP_S, or what is
# left of the budget), its status and output tail recorded.
run_step() {
    local title=$1 cap=$2 lines=$3 index=${#TITLES[@]}
    shift 3
    local left=$((DEADLINE - SECONDS)) start=$SECONDS status rc limit
    local log=$LOGS/step_$index.log
    echo "[$((SECONDS)) s] $title ..."
    if ((left < MIN_STEP_S)); then
        status="SKIPPED (time budget spent)"
        : >"$log"
    else
        limit=$((cap < left ? cap : left))
        ln -sf "$log" "$LOGS/current.log"
        timeout --kill-after=5 "$limit" bash -c "$*" >"$log" 2>&1
        rc=$?
        case $rc in
            0) status="ok" ;;
            124 | 137) status="TIMEOUT (${limit} s)" ;;
            *) status="FAILED (exit $rc)" ;;
        esac
    fi
    TITLES+=("$title") STATUSES+=("$status") DURATIONS+=($((SECONDS - start)))
    {
        echo "## $((index + 1)). $title"
        echo
        echo "**$status** in $((SECONDS - start)) s"
        echo
        echo '```text'
        tr '\r' '\n' <"$log" | grep -v '^[[:space:]]*$' | tail -n "$lines"
        echo '```'
    } >"$(section_of "$index")"
    write_report
    echo "[$((SECONDS)) s] $title: $status"
}

run_step "install (wheels/gpu-py312, hybridfc editable)" 150 30 step_install
run_step "device and versions" 40 40 step_device
run_step "CUDA tests (tests/test_cuda.py)" 90 50 step_tests
run_step "train fp16 (ZeRO-0, deepspeed launcher)" 75 25 step_train fp16 29611
run_step "train bf16 (ZeRO-1, deepspeed launcher)" 75 25 step_train bf16 29612
run_step "bench_head_step.py --device cuda" 90 60 step_bench bench_head_step.py
run_step "bench_selection.py --device cuda" 100 60 step_bench bench_selection.py

echo
sed '/^## /,$d' "$REPORT"  # the report's head: its summary table
echo "report: $REPORT"
for status in "${STATUSES[@]}"; do
    [[ "$status" == ok ]] || exit 1
done
