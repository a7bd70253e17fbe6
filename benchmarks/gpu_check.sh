#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the GPU figures of issue 13 in one prepared run, on a machine
# with one NVIDIA GPU, CuPy (cupy-cuda12x or -cuda13x), a CUDA build of PyTorch, and
# npgpt's own needs (numpy, tqdm, matplotlib; pytest and threadpoolctl for steps 1-2).
# npgpt need not be installed: everything runs from the checkout with PYTHONPATH=.
#
#   bash benchmarks/gpu_check.sh                 # steps 0-3 below, all within DEADLINE_S
#   RESUME=1 bash benchmarks/gpu_check.sh        # step 0 and 3 only: continue the lecture
#                                                #   run of an earlier call towards 5000 its
#   TRAIN_DTYPE=float16 bash benchmarks/gpu_check.sh   # issue 17: step 3 in --dtype float16
#                                                #   (compare with a float32 run's log)
#   DEVICE=cpu bash benchmarks/gpu_check.sh      # dry run: the same steps on the CPU at tiny
#                                                #   sizes (DRY_RUN=1 means the same)
#
# Every figure and log goes to $OUT (default ./gpu_check_out; at most 8 files), and each
# step appends its result lines to $OUT/summary.txt (also printed) as soon as it ends:
#   summary.txt                 environment, then one block per step (read this first)
#   1_tests.log                 pytest on the GPU cases: tests/test_kernels.py (if present),
#                               test_gemm.py, test_backend.py (with a real GPU run of
#                               train.py stopped by Ctrl-C and resumed, bit for bit),
#                               test_host_sync.py, test_model.py, test_mixed.py
#   2a_bench_fp32_fused.log     benchmarks/train_step.py --device gpu --config lecture,
#   2b_bench_tf32_fused.log       float32 / --tf32 with NPGPT_FUSED=1 (the fused CUDA kernels)
#   2c_bench_fp32_plain.log       and float32 with NPGPT_FUSED=0 (plain CuPy array code);
#                               each: npgpt against PyTorch eager (SDPA and manual attention)
#   2d_bench_fp16_fused.log     --dtype float16 (issue 17): npgpt mixed precision and npgpt
#                               float32 against torch.autocast(float16) + GradScaler
#   (2e, 2f: lines in summary.txt) benchmarks/gpu_products.py: attention's batched products,
#                               npgpt's against CuPy's and PyTorch's, and the fused float32
#                               attention on whole rows against query tiles; gpu_profile.py
#                               --tf32 and --dtype float16: the fused steps' GPU time kernel by
#                               kernel; --tf32 --host: the TF32 step's host time by function
#   3_lecture_train.log         python train.py --preset lecture --device gpu --tf32
#   3_lecture_log.jsonl         that run's log.jsonl (evals: iter, train_loss, val_loss, ...)
#   (3_lecture_loss.png         its loss curves, only when fewer than 8 files are there)
#
# Step 0 records the GPU, driver, CUDA and package versions; step 1 continues to step 2
# whatever the tests do; each step runs under `timeout` so that one hang cannot eat the
# deadline. Step 3 is the lecture preset's 5000-iteration run (NPGPT_FUSED=1, TF32), in
# TRAIN_DIR (default /tmp/npgpt_gpu_check_lecture, outside $OUT). Before it starts, the
# script estimates from the time left and the measured step time (2b's npgpt ms/step,
# else 2a's or 2c's, else a 30-iteration probe run) how many iterations fit, and passes
# --max-iters N --lr-decay-iters 5000: the learning-rate schedule stays the 5000-iteration
# one, so a shorter run is an exact prefix of the full run. As a safety net the run gets
# SIGINT before the deadline (train.py then saves a checkpoint and exits). A later call
# with RESUME=1, on the same machine (TRAIN_DIR must still hold ckpt.npz), continues it
# with --resume towards 5000; without a checkpoint it starts the run afresh.
#
# Settings (environment variables; the defaults are for the GPU, DEVICE=cpu's in brackets):
#   OUT=gpu_check_out     DEADLINE_S=560 (whole script's wall time)   RESUME=0
#   DEVICE=gpu [cpu]      BENCH_CONFIG=lecture [tiny]   BENCH_STEPS=30 [5] timed steps each
#   PRESET=lecture [tiny] TARGET_ITERS=the preset's max_iters (5000 [50])
#   TRAIN_DTYPE=float32 (step 3 with --tf32) or float16 (step 3 with --dtype float16)
#   TRAIN_DIR=/tmp/npgpt_gpu_check_${PRESET}_$TRAIN_DTYPE   TESTS_TIMEOUT=150   BENCH_TIMEOUT=120
#   TESTS=the test files of step 1 (default: the six above; e.g. TESTS="tests/test_kernels.py
#   tests/test_mixed.py" in a rerun after a kernel change)
#   SKIP_TESTS=0  SKIP_BENCH=0  SKIP_TRAIN=0 (1: no step 3, and steps 1-2 keep no time for it)
#   PYTHON=python3   NPGPT_DATA_DIR: the folder holding
#   tinyshakespeare.txt (default: .data, shared/data or ../shared/data, the first that has
#   it; without one train.py downloads the corpus, which needs the network)
#   Estimate knobs: STARTUP_S=30 [10] (train.py's start, kernel compiles), MARGIN_S=45 [15]
#   (the run is planned to end this long before the deadline; SIGINT comes 10 s later),
#   DROPOUT_FACTOR=1.25 (a lecture training step, dropout 0.2, against the benchmark's
#   dropout-free step), EVAL_FWD_FRAC=0.4 (an eval batch's forward against a train step),
#   EVAL_EXTRA_S=2 [0.2] (checkpoint and plot at each eval).
set -u

T0=$SECONDS
DEADLINE_S=${DEADLINE_S:-560}
RESUME=${RESUME:-0}
[ "${DRY_RUN:-0}" = 1 ] && DEVICE=${DEVICE:-cpu}
DEVICE=${DEVICE:-gpu}
PY=${PYTHON:-python3}
SKIP_TESTS=${SKIP_TESTS:-0}
SKIP_BENCH=${SKIP_BENCH:-0}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
SKIP_TRAIN=${SKIP_TRAIN:-0}
BENCH_MIN_S=40    # the least time a benchmark run is started with
TRAIN_MIN_S=120   # the least time steps 1-2 leave for step 3
[ "$SKIP_TRAIN" = 1 ] && TRAIN_MIN_S=0
if [ "$DEVICE" = gpu ]; then
  BENCH_CONFIG=${BENCH_CONFIG:-lecture}; BENCH_STEPS=${BENCH_STEPS:-30}
  PRESET=${PRESET:-lecture}; STARTUP_S=${STARTUP_S:-30}; MARGIN_S=${MARGIN_S:-45}
  EVAL_EXTRA_S=${EVAL_EXTRA_S:-2}; GPU_FLAGS=(--tf32)
elif [ "$DEVICE" = cpu ]; then
  BENCH_CONFIG=${BENCH_CONFIG:-tiny}; BENCH_STEPS=${BENCH_STEPS:-5}
  PRESET=${PRESET:-tiny}; STARTUP_S=${STARTUP_S:-10}; MARGIN_S=${MARGIN_S:-15}
  EVAL_EXTRA_S=${EVAL_EXTRA_S:-0.2}; GPU_FLAGS=()  # --tf32 is GPU-only: left out on the CPU
else
  echo "gpu_check.sh: DEVICE must be gpu or cpu, got '$DEVICE'" >&2; exit 2
fi
TRAIN_DTYPE=${TRAIN_DTYPE:-float32}
case $TRAIN_DTYPE in
  float32) TRAIN_FLAGS=(${GPU_FLAGS[@]+"${GPU_FLAGS[@]}"}) ;;
  float16) TRAIN_FLAGS=(--dtype float16) ;;
  *) echo "gpu_check.sh: TRAIN_DTYPE must be float32 or float16, got '$TRAIN_DTYPE'" >&2; exit 2 ;;
esac
DROPOUT_FACTOR=${DROPOUT_FACTOR:-1.25}
EVAL_FWD_FRAC=${EVAL_FWD_FRAC:-0.4}
TRAIN_DIR=${TRAIN_DIR:-/tmp/npgpt_gpu_check_${PRESET}_$TRAIN_DTYPE}

OUT_DIR=${OUT:-gpu_check_out}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2   # the repository root
SUMMARY=$OUT_DIR/summary.txt

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}  # fewer progress-bar redraws in the logs
if [ -z "${NPGPT_DATA_DIR:-}" ]; then
  for d in .data shared/data ../shared/data; do
    if [ -f "$d/tinyshakespeare.txt" ]; then NPGPT_DATA_DIR=$(cd "$d" && pwd); break; fi
  done
fi
[ -n "${NPGPT_DATA_DIR:-}" ] && export NPGPT_DATA_DIR

note() { echo "$*" | tee -a "$SUMMARY"; }
command -v timeout >/dev/null 2>&1 || { echo "gpu_check.sh: needs timeout (coreutils)" >&2; exit 2; }
left() { echo $((DEADLINE_S - (SECONDS - T0))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# run_logged LOG LIMIT_S CMD...: CMD under timeout (SIGTERM at LIMIT_S, SIGKILL 10 s later),
# stdout and stderr into LOG; sets RC and WALL (seconds).
run_logged() {
  local log=$1 limit=$2 t=$SECONDS
  shift 2
  echo "\$ $*   (limit ${limit}s)" >"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  RC=$?
  WALL=$((SECONDS - t))
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then echo "[gpu_check: timed out after ${limit}s]" >>"$log"; fi
}

# why LOG RC: a short reason for a failed step (the log's last non-empty line).
why() {
  case $2 in
    0) echo "ok" ;;
    124|137) echo "TIMED OUT" ;;
    *) echo "FAILED (rc $2): $(grep -v '^\[gpu_check' "$1" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-200)" ;;
  esac
}

# ----------------------------------------------------------------------- step 0: environment
: >"$SUMMARY"
MODE=full; [ "$RESUME" = 1 ] && MODE=resume
note "== npgpt gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), mode $MODE, device $DEVICE, deadline ${DEADLINE_S}s, out $OUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  note "nvidia-smi: $(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
else
  note "nvidia-smi: not found"
fi
ENV_INFO=$(NPGPT_FUSED=1 timeout 90 "$PY" - <<'PY' 2>&1
import importlib, platform
print(f"python {platform.python_version()} ({platform.machine()})")
for name in ("numpy", "cupy", "torch"):
    try:
        m = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - each missing piece is a fact to record
        print(f"{name}: not importable ({type(e).__name__}: {e})")
        continue
    line = f"{name} {m.__version__}"
    try:
        if name == "cupy":
            rt, dr = m.cuda.runtime.runtimeGetVersion(), m.cuda.runtime.driverGetVersion()
            props = m.cuda.runtime.getDeviceProperties(0)
            dev = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            line += (f": CUDA runtime {rt // 1000}.{rt % 1000 // 10} ({rt}), driver API "
                     f"{dr // 1000}.{dr % 1000 // 10}, {dev}, compute capability "
                     f"{props['major']}.{props['minor']}, {props['multiProcessorCount']} SMs")
        elif name == "torch":
            line += f", CUDA {m.version.cuda}, cuda.is_available() {m.cuda.is_available()}"
            if m.cuda.is_available():
                line += f", {m.cuda.get_device_name()}"
    except Exception as e:  # noqa: BLE001
        line += f" ({type(e).__name__}: {e})"
    print(line)
try:  # does NPGPT_FUSED=1 (set for this check) select the fused kernels in this checkout?
    import cupy
    import numpy as np
    from npgpt import kernels
    print(f"npgpt.kernels.applies(cupy, float32) with NPGPT_FUSED=1: "
          f"{kernels.applies(cupy, np.float32)}")
except Exception as e:  # noqa: BLE001
    print(f"npgpt fused kernels: not checked ({type(e).__name__}: {e})")
for name in ("tqdm", "matplotlib", "threadpoolctl", "pytest"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not importable ({type(e).__name__})")
PY
)
note "$(echo "$ENV_INFO" | paste -sd ';' | sed 's/;/; /g')"
note "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed/untracked paths)"
note "data: NPGPT_DATA_DIR=${NPGPT_DATA_DIR:-(unset: no local tinyshakespeare.txt; train.py will try to download it)}"

# --------------------------------------------------------------------------- step 1: tests
if [ "$RESUME" != 1 ] && [ "$SKIP_TESTS" != 1 ]; then
  TEST_FILES=()
  if [ -n "${TESTS:-}" ]; then
    read -r -a TEST_FILES <<<"$TESTS"   # a rerun's choice: only the files that matter
  elif [ -f tests/test_kernels.py ]; then
    TEST_FILES+=(tests/test_kernels.py)
  else
    note "[1] note: tests/test_kernels.py is absent: left out"
  fi
  [ -n "${TESTS:-}" ] || TEST_FILES+=(tests/test_gemm.py tests/test_backend.py
                                      tests/test_host_sync.py tests/test_model.py
                                      tests/test_mixed.py)
  PYTEST_ARGS=(-q -rfEs -p no:cacheprovider --continue-on-collection-errors)
  if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then PYTEST_ARGS+=(--timeout=90); fi
  limit=$(min "$TESTS_TIMEOUT" $(($(left) - 3 * BENCH_MIN_S - TRAIN_MIN_S)))
  if [ "$limit" -lt 20 ]; then
    note "[1] tests: SKIPPED (only $(left)s left)"
  else
    run_logged "$OUT_DIR/1_tests.log" "$limit" "$PY" -m pytest "${PYTEST_ARGS[@]}" "${TEST_FILES[@]}"
    counts=$(grep -E '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed)' "$OUT_DIR/1_tests.log" | tail -n 1 | sed -E 's/=+//g; s/^ +| +$//g')
    case $RC in
      0) status="all passed" ;;
      1) status="SOME FAILED" ;;
      *) status=$(why "$OUT_DIR/1_tests.log" "$RC") ;;
    esac
    note "[1] tests ${TEST_FILES[*]}: ${counts:-no pytest summary line} (wall ${WALL}s, rc $RC: $status)"
    grep -E '^(FAILED|ERROR) ' "$OUT_DIR/1_tests.log" | head -n 15 | sed 's/^/[1]   /' | tee -a "$SUMMARY"
  fi
fi

# ---------------------------------------------------------------------- step 2: benchmarks
# bench_figures LOG: "npgpt X ms, torch sdpa Y ms, ...; ratios" from train_step.py's report
bench_figures() {
  "$PY" - "$1" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
ms = dict(re.findall(r"^\s+(npgpt float32|npgpt|torch sdpa|torch manual)\s+([\d.]+) ms/step",
                    text, re.M))
ratios = re.findall(r"ratio (.+? ms / .+?) ms = ([\d.]+)x", text)
loss = re.search(r"loss on the first batch[^:]*: (.*)", text)
parts = [", ".join(f"{k} {v} ms/step" for k, v in ms.items()) or "no step times"]
if ratios:
    parts.append("; ".join(f"{k} = {v}x" for k, v in ratios))
if loss:
    parts.append("first-batch loss: " + loss.group(1).strip())
print(" | ".join(parts))
PY
}
bench_ms() {  # bench_ms LOG: npgpt's median ms/step (empty if none)
  grep -E '^\s+npgpt\s+[0-9.]+ ms/step' "$1" 2>/dev/null | tail -n 1 | awk '{print $2}'
}

declare -A BENCH_LOG=()
if [ "$RESUME" != 1 ] && [ "$SKIP_BENCH" != 1 ]; then
  n_left=4
  for spec in "2a fp32_fused 1" "2b tf32_fused 1" "2c fp32_plain 0" "2d fp16_fused 1"; do
    read -r tag name fused <<<"$spec"
    log="$OUT_DIR/${tag}_bench_${name}.log"
    BENCH_LOG[$tag]=$log
    n_left=$((n_left - 1))
    flags=(--device "$DEVICE" --config "$BENCH_CONFIG" --steps "$BENCH_STEPS")
    [ "$DEVICE" = cpu ] && flags+=(--no-memory)
    [ "$tag" = 2b ] && flags+=(${GPU_FLAGS[@]+"${GPU_FLAGS[@]}"})
    [ "$tag" = 2d ] && flags+=(--dtype float16)
    limit=$(min "$BENCH_TIMEOUT" $(($(left) - n_left * BENCH_MIN_S - TRAIN_MIN_S)))
    if [ "$limit" -lt "$BENCH_MIN_S" ]; then
      note "[$tag] bench: SKIPPED (only $(left)s left)"
      continue
    fi
    run_logged "$log" "$limit" env NPGPT_FUSED="$fused" "$PY" benchmarks/train_step.py "${flags[@]}"
    note "[$tag] train_step.py ${flags[*]} NPGPT_FUSED=$fused (wall ${WALL}s, rc $RC: $(why "$log" "$RC")): $(bench_figures "$log")"
  done
  a=$(bench_ms "${BENCH_LOG[2a]}"); b=$(bench_ms "${BENCH_LOG[2b]}"); c=$(bench_ms "${BENCH_LOG[2c]}")
  if [ -n "$a" ] && [ -n "$c" ]; then
    note "[2] fused kernels' gain, float32 (2c plain / 2a fused npgpt ms): $(awk -v a="$a" -v c="$c" 'BEGIN{printf "%.2fx (%s / %s ms)", c/a, c, a}')"
  fi
  if [ -n "$a" ] && [ -n "$b" ]; then
    note "[2] TF32 gain, fused (2a fp32 / 2b tf32 npgpt ms): $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.2fx (%s / %s ms)", a/b, a, b}')"
  fi
  # 2e: batched float16 products (issue 17): lines into the summary only (8 files at most)
  if [ "$(left)" -gt $((TRAIN_MIN_S + 60)) ]; then
    t=$SECONDS
    prod=$(timeout -k 5 60 "$PY" benchmarks/gpu_products.py --device "$DEVICE" 2>&1 | tail -n 4)
    note "[2e] benchmarks/gpu_products.py --device $DEVICE (wall $((SECONDS - t))s):"
    echo "$prod" | sed 's/^/[2e]   /' | tee -a "$SUMMARY"
  fi
  # 2f: the TF32 and float16 steps' GPU time kernel by kernel (torch.profiler sees CuPy's
  # kernels too), then the TF32 step's host time function by function (cProfile)
  for flags in "--tf32" "--dtype float16" "--tf32 --host"; do
    if [ "$DEVICE" = gpu ] && [ "$(left)" -gt $((TRAIN_MIN_S + 60)) ]; then
      t=$SECONDS
      # shellcheck disable=SC2086  # (flags: two words for --dtype float16)
      lines=13; [ "${flags#*--host}" != "$flags" ] && lines=27  # (host: two tables of 12)
      prof=$(NPGPT_FUSED=1 timeout -k 5 90 "$PY" benchmarks/gpu_profile.py $flags 2>&1 | grep -v '^\(USDT\|ERROR\|WARNING\|STAGE\):' | tail -n "$lines")
      note "[2f] NPGPT_FUSED=1 benchmarks/gpu_profile.py $flags (wall $((SECONDS - t))s):"
      echo "$prof" | sed 's/^/[2f]   /' | tee -a "$SUMMARY"
    fi
  done
fi

# ------------------------------------------------------------- step 3: the lecture training
TRAIN_LOG=$OUT_DIR/3_${PRESET}_train.log
: >"$TRAIN_LOG"
STATE=$TRAIN_DIR/gpu_check_state.txt   # wall seconds of earlier calls' step 3 (for RESUME)
MARKER=$TRAIN_DIR/gpu_check_marker     # this folder is gpu_check's scratch: may be wiped

# the preset's evaluation settings and iteration count: "eval_interval eval_iters max_iters"
read -r EVAL_INTERVAL EVAL_ITERS PRESET_ITERS < <("$PY" -c "
from npgpt.trainconfig import PRESETS, TrainConfig
c = TrainConfig(**PRESETS['$PRESET'])
print(c.eval_interval, c.eval_iters, c.max_iters)" 2>/dev/null)
TARGET_ITERS=${TARGET_ITERS:-${PRESET_ITERS:-5000}}
EVAL_INTERVAL=${EVAL_INTERVAL:-500}; EVAL_ITERS=${EVAL_ITERS:-200}

# train_results: the run's evals, best and last val loss, step time into the summary;
# log.jsonl (and loss.png if room) into $OUT
train_results() {
  [ -f "$TRAIN_DIR/log.jsonl" ] || return 0
  cp "$TRAIN_DIR/log.jsonl" "$OUT_DIR/3_${PRESET}_log.jsonl"
  "$PY" - "$TRAIN_DIR/log.jsonl" "$TRAIN_DIR/ckpt.npz" "$TARGET_ITERS" <<'PY' | tee -a "$SUMMARY"
import json, statistics, sys
import numpy as np
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
evals = [r for r in recs if "val_loss" in r]
steps = [r for r in recs if "ms_per_iter" in r and r["iter"] > 0]
print("[3]   val loss at each eval: " + ", ".join(f"{r['iter']}: {r['val_loss']:.4f}" for r in evals))
if evals:
    last, best = evals[-1], min(evals, key=lambda r: r["val_loss"])
    print(f"[3]   last eval: iter {last['iter']}/{sys.argv[3]}, train {last['train_loss']:.4f}, "
          f"val {last['val_loss']:.4f}; best val {best['val_loss']:.4f} (iter {best['iter']}); "
          f"training time (train.py's elapsed_s, evals excluded) {last['elapsed_s']:.1f}s")
try:
    meta = json.loads(str(np.load(sys.argv[2])["__meta__"]))
    print(f"[3]   checkpoint: iteration {meta['iter']}, elapsed_s {meta['elapsed_s']:.1f}, "
          f"best_val_loss {meta['best_val_loss']:.4f}")
except Exception as e:  # noqa: BLE001
    print(f"[3]   checkpoint: unreadable ({type(e).__name__}: {e})")
if steps:
    ms = [r["ms_per_iter"] for r in steps]
    print(f"[3]   step time (logged windows): median {statistics.median(ms):.1f} ms/iter, "
          f"{statistics.median(r['tokens_per_s'] for r in steps):,.0f} tok/s")
PY
  if [ -f "$TRAIN_DIR/loss.png" ] && [ "$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)" -lt 8 ]; then
    cp "$TRAIN_DIR/loss.png" "$OUT_DIR/3_${PRESET}_loss.png"
  fi
}

resume_flag=()
start_iter=0
step_ms=""; step_src=""
if [ "$SKIP_TRAIN" = 1 ]; then
  note "[3] SKIP_TRAIN=1: step 3 not run"
  start_iter=-1
elif [ "$RESUME" = 1 ]; then
  if [ -f "$TRAIN_DIR/ckpt.npz" ]; then
    start_iter=$("$PY" -c "
import json, sys, numpy as np
print(json.loads(str(np.load(sys.argv[1])['__meta__']))['iter'])" "$TRAIN_DIR/ckpt.npz" 2>/dev/null)
    if [ -z "$start_iter" ]; then
      note "[3] RESUME=1: $TRAIN_DIR/ckpt.npz is unreadable; step 3 not run"; start_iter=-1
    else
      resume_flag=(--resume)
      # the real training steps of the earlier call(s): median ms_per_iter of the step records
      step_ms=$("$PY" -c "
import json, sys, statistics
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ms = [r['ms_per_iter'] for r in recs if 'ms_per_iter' in r and r['iter'] > 0]
print(round(statistics.median(ms), 2) if ms else '')" "$TRAIN_DIR/log.jsonl" 2>/dev/null)
      [ -n "$step_ms" ] && step_src="the earlier call's log.jsonl (median ms_per_iter)"
      note "[3] RESUME=1: $TRAIN_DIR/ckpt.npz is at iteration $start_iter of $TARGET_ITERS"
    fi
  else
    note "[3] RESUME=1 but $TRAIN_DIR/ckpt.npz does not exist (a fresh machine?): starting the run afresh"
  fi
fi
if [ "$start_iter" != -1 ] && [ ${#resume_flag[@]} = 0 ]; then
  if [ -d "$TRAIN_DIR" ] && [ -f "$MARKER" ]; then rm -rf "$TRAIN_DIR"; fi
  if [ -e "$TRAIN_DIR" ]; then
    note "[3] $TRAIN_DIR exists and is not gpu_check's scratch folder: step 3 not run (set TRAIN_DIR)"
    start_iter=-1
  else
    mkdir -p "$TRAIN_DIR" && touch "$MARKER" && echo 0 >"$STATE"
  fi
fi

if [ "$start_iter" = -1 ]; then
  :
elif [ "$start_iter" -ge "$TARGET_ITERS" ]; then
  note "[3] the run is already at iteration $start_iter >= $TARGET_ITERS: nothing to do"
  train_results
else
  # the step time: the real run's (resume), else benchmark 2b, 2a, 2c, else a short probe
  if [ -z "$step_ms" ]; then
    tags="2b 2a 2c"; [ "$TRAIN_DTYPE" = float16 ] && tags="2d"
    for tag in $tags; do
      ms=$(bench_ms "${BENCH_LOG[$tag]:-/nonexistent}")
      if [ -n "$ms" ]; then
        step_ms=$(awk -v m="$ms" -v f="$DROPOUT_FACTOR" 'BEGIN{printf "%.2f", m*f}')
        step_src="benchmark $tag's npgpt ${ms} ms/step x $DROPOUT_FACTOR (dropout)"
        break
      fi
    done
  fi
  if [ -z "$step_ms" ] && [ "$(left)" -gt $((2 * STARTUP_S + MARGIN_S + 30)) ]; then
    probe=/tmp/npgpt_gpu_check_probe_$$
    rm -rf "$probe"
    echo "== probe: 30 iterations to time a step" >>"$TRAIN_LOG"
    t=$SECONDS
    NPGPT_FUSED=1 timeout -k 10 "$(min 150 $(($(left) - MARGIN_S)))" "$PY" train.py --preset "$PRESET" \
      --device "$DEVICE" ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} --out-dir "$probe" --max-iters 30 \
      --eval-iters 1 --eval-interval 1000000 --log-interval 10 >>"$TRAIN_LOG" 2>&1
    prc=$?
    step_ms=$("$PY" -c "
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ms = [r['ms_per_iter'] for r in recs if 'ms_per_iter' in r and r['iter'] > 0]
print(ms[-1] if ms else '')" "$probe/log.jsonl" 2>/dev/null)
    step_src="a 30-iteration probe run ($((SECONDS - t))s wall, rc $prc)"
    rm -rf "$probe"
  fi
  if [ -z "$step_ms" ]; then
    note "[3] no step time could be measured (see $TRAIN_LOG): step 3 not run"
  else
    budget=$(( $(left) - MARGIN_S ))
    plan=$("$PY" - "$budget" "$step_ms" "$start_iter" "$TARGET_ITERS" "$EVAL_INTERVAL" \
      "$EVAL_ITERS" "$STARTUP_S" "$EVAL_FWD_FRAC" "$EVAL_EXTRA_S" <<'PY'
import sys
budget, step_ms, start, target, ei, eiters, startup, frac, extra = sys.argv[1:]
budget, step_s, startup, frac, extra = (float(budget), float(step_ms) / 1e3, float(startup),
                                        float(frac), float(extra))
start, target, ei, eiters = int(start), int(target), int(ei), int(eiters)
eval_s = 2 * eiters * frac * step_s + extra   # train and val splits, forward only

def evals(n):  # evals a run from `start` to n makes (a fresh run: also one at 0)
    k = n // ei - start // ei + (n % ei != 0)
    return k + (start == 0)

def cost(n):
    return startup + (n - start) * step_s + evals(n) * eval_s

granule = max(1, ei // 5)
best = None
for n in sorted({*range(start + granule - start % granule, target, granule), target}):
    if n > start and cost(n) <= budget:
        best = n
if best is None:
    print(f"0 {eval_s:.1f} {cost(min(target, start + granule)):.0f}")
else:
    print(f"{best} {eval_s:.1f} {cost(best):.0f}")
PY
)
    read -r max_iters eval_s est_s <<<"$plan"
    if [ -z "${max_iters:-}" ] || [ "$max_iters" = 0 ]; then
      note "[3] plan: ${budget}s usable; step ${step_ms} ms (from $step_src), eval ~${eval_s:-?}s each: not even $((start_iter + EVAL_INTERVAL / 5)) iterations fit (~${est_s:-?}s): step 3 not run"
    else
      note "[3] plan: $(left)s left, ${MARGIN_S}s kept as margin; step ${step_ms} ms (from $step_src), eval ~${eval_s}s each ($EVAL_ITERS batches x 2 splits), start-up ${STARTUP_S}s -> --max-iters $max_iters of $TARGET_ITERS (estimated ${est_s}s), --lr-decay-iters $TARGET_ITERS (the $TARGET_ITERS-iteration schedule: this run is a prefix of the full one)$([ "$max_iters" -lt "$TARGET_ITERS" ] && echo "; continue with RESUME=1 on the same machine")"
      # SIGINT 10 s after the planned end: train.py finishes its step (or eval), saves a
      # checkpoint and stops; SIGKILL 25 s later if it has not (the last eval's stays)
      limit=$(( $(left) - MARGIN_S + 10 ))
      t=$SECONDS
      cmd=("$PY" train.py --preset "$PRESET" --device "$DEVICE" ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
           --out-dir "$TRAIN_DIR" --max-iters "$max_iters" --lr-decay-iters "$TARGET_ITERS"
           ${resume_flag[@]+"${resume_flag[@]}"})
      echo "\$ NPGPT_FUSED=1 ${cmd[*]}   (SIGINT after ${limit}s)" >>"$TRAIN_LOG"
      log_lines=$(wc -l <"$TRAIN_LOG")
      NPGPT_FUSED=1 timeout -s INT -k 25 "$limit" "${cmd[@]}" >>"$TRAIN_LOG" 2>&1
      RC=$?
      WALL=$((SECONDS - t))
      prev=$(cat "$STATE" 2>/dev/null || echo 0)
      echo $((prev + WALL)) >"$STATE"
      case $RC in
        0) status="finished" ;;
        124) status="INTERRUPTED by the deadline's SIGINT (checkpoint saved; RESUME=1 continues)" ;;
        137) status="KILLED after the deadline's SIGINT (the last eval's checkpoint stays)" ;;
        *) status="$(why "$TRAIN_LOG" "$RC")" ;;
      esac
      note "[3] train.py (wall ${WALL}s this call, $((prev + WALL))s over all calls; rc $RC: $status)"
      tail -n +$((log_lines + 1)) "$TRAIN_LOG" | tr '\r' '\n' | grep -E '^(done:|error:|interrupted|Traceback)' | tail -n 3 | sed 's/^/[3]   /' | tee -a "$SUMMARY"
      train_results
    fi
  fi
fi

note "== gpu_check done in $((SECONDS - T0))s (deadline ${DEADLINE_S}s); files: $(cd "$OUT_DIR" && printf '%s ' *)"
