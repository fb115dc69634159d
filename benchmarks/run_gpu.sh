#!/usr/bin/env bash
# The GPU run behind benchmarks/RESULTS.md: bench and profile at batch 128, ngf=ndf 64 and 128,
# fp32 and bf16; the GPU tests (pytest -m gpu tests); the pytest-benchmark suites with JSON output.
# Results land in $OUT as at most 8 files (the device tool's limit): summary.md, RESULTS-gpu.md
# (blocks to paste into benchmarks/RESULTS.md), logs.tar.gz, suites.tar.gz (pytest-benchmark
# JSON), traces.tar.gz (Chrome traces for https://ui.perfetto.dev); each part adds its suffix.
#
#   OUT=/tmp/gpu benchmarks/run_gpu.sh 1     # bench + profile, 4 configurations    (under 10 min)
#   OUT=/tmp/gpu benchmarks/run_gpu.sh 2     # GPU tests + pytest benchmark suites   (under 10 min)
#   OUT=/tmp/gpu benchmarks/run_gpu.sh       # both, one after the other             (about 20 min)
#
# Every stage runs under a time limit (SIGINT first, so pytest still writes its JSON), inside a
# budget per part of FASTGAN_GPU_BUDGET_S seconds (default 560: a device call stops at 600).
# Stages left without time are listed as skipped; CONFIGS="128:bf16" (say) reruns part 1 for some
# configurations only. To fit the budget, the suites leave out the compile peers at batch 64, and
# compile-max-autotune, which part 1's bench measures at batch 128.
set -uo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python3}
BUDGET=${FASTGAN_GPU_BUDGET_S:-560}
CONFIGS=${CONFIGS:-"64:fp32 64:bf16 128:fp32 128:bf16"}  # part 1's ngf=ndf:dtype, in order of priority
WORK=$(mktemp -d /tmp/fastgan-gpu-XXXXXX)
mkdir -p "$OUT" "$WORK/logs" "$WORK/traces" "$WORK/suites"
export PYTHONUNBUFFERED=1
# Compiled graphs and autotuning results carry over from one stage (and part, on a warm machine) to the next.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fastgan-inductor-cache}
START=$(date +%s)

stage() {  # stage NAME CAP_SECONDS COMMAND...: run COMMAND into logs/NAME.log under min(CAP, budget left)
    local name=$1 cap=$2
    shift 2
    local left=$((START + BUDGET - $(date +%s)))
    if ((left < 20)); then
        printf '| %s | skipped: no time left | 0 |\n' "$name" >>"$WORK/status.md"
        return
    fi
    local limit=$((cap < left ? cap : left)) t0
    t0=$(date +%s)
    echo "== $name (limit ${limit} s)"
    timeout -s INT -k 20 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    local rc=$? status
    case $rc in 0) status=ok ;; 124 | 137) status="stopped at ${limit} s" ;; *) status="exit $rc" ;; esac
    printf '| %s | %s | %s |\n' "$name" "$status" "$(($(date +%s) - t0))" >>"$WORK/status.md"
    tail -n 4 "$WORK/logs/$name.log"
}

environment() {  # the machine and versions, into logs/environment.log
    echo "== environment"
    exec 3>&1 >"$WORK/logs/environment.log" 2>&1
    nvidia-smi
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', \
torch.backends.cudnn.version(), 'triton', triton.__version__, torch.cuda.get_device_name())"
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|pytest-benchmark|tqdm|numpy) '
    git log -1 --oneline 2>/dev/null
    git status --short 2>/dev/null
    exec 1>&3 2>&1 3>&-
}

part1() {
    environment
    stage build-ext 180 "$PY" -m fastgan build-ext
    local size dtype
    for config in $CONFIGS; do
        size=${config%:*} dtype=${config#*:}
        local args=(--batch 128 --ngf "$size" --ndf "$size" --dtype "$dtype")
        stage "bench-b128-g$size-$dtype" 150 "$PY" -m fastgan bench "${args[@]}" --steps 50 --warmup 10 \
            --markdown "$WORK/RESULTS-gpu.md"
        stage "profile-b128-g$size-$dtype" 60 "$PY" -m fastgan profile "${args[@]}" --steps 3 --warmup 3 \
            --compile-modes default --trace-dir "$WORK/traces" --markdown "$WORK/RESULTS-gpu.md"
    done
}

suite() {  # suite NAME CAP FILE [pytest args...]
    local name=$1 cap=$2 file=$3
    shift 3
    stage "suite-$name" "$cap" "$PY" -m pytest "$file" -q -ra -p no:cacheprovider --benchmark-max-time 0.5 \
        --benchmark-columns min,median,iqr,rounds,iterations --benchmark-json "$WORK/suites/$name.json" "$@"
}

part2() {
    environment
    stage build-ext 180 "$PY" -m fastgan build-ext
    stage gpu-tests 180 "$PY" -m pytest -m gpu tests -q -ra -p no:cacheprovider --junitxml "$WORK/logs/gpu-tests.xml"
    suite train-step 240 benchmarks/test_bench_train_step.py -k "not (compile and b64) and not max-autotune"
    suite networks 200 benchmarks/test_bench_networks.py -k "not (compile and b64)"
    suite ops 150 benchmarks/test_bench_ops.py
}

suite_tables() {  # the suites' medians and speedups, one markdown table per suite
    "$PY" - "$WORK"/suites/*.json <<'EOF'
import json, sys
for path in sys.argv[1:]:
    try:
        runs = json.load(open(path))["benchmarks"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"\n{path}: no results ({exc})")
        continue
    print(f"\n#### {path.rsplit('/', 1)[-1]}\n\n| group | peer | median ms | vs eager | vs compile | peak MiB |\n|---|---|---|---|---|---|")
    for b in sorted(runs, key=lambda b: (b["group"], b["stats"]["median"])):
        info = b["extra_info"]
        cells = [b["group"], info.get("peer"), f"{1e3 * b['stats']['median']:.4f}",
                 *(f"{info[k]:.2f}" if k in info else "-" for k in ("speedup_over_eager", "speedup_over_compile")),
                 info.get("peak_mib", "-")]
        print("| " + " | ".join(map(str, cells)) + " |")
EOF
}

finish() {  # bundle everything into $OUT and print the summary
    local suffix=$1
    {
        echo "# fastgan GPU run, part $PART, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "| stage | status | seconds |"
        echo "|---|---|---|"
        cat "$WORK/status.md"
        [ -f "$WORK/RESULTS-gpu.md" ] && cat "$WORK/RESULTS-gpu.md"
        compgen -G "$WORK/suites/*.json" >/dev/null && suite_tables
    } >"$OUT/summary$suffix.md"
    [ -f "$WORK/RESULTS-gpu.md" ] && cp "$WORK/RESULTS-gpu.md" "$OUT/RESULTS-gpu$suffix.md"
    tar -czf "$OUT/logs$suffix.tar.gz" -C "$WORK" logs
    compgen -G "$WORK/suites/*.json" >/dev/null && tar -czf "$OUT/suites$suffix.tar.gz" -C "$WORK" suites
    if compgen -G "$WORK/traces/*.json" >/dev/null; then
        tar -czf "$OUT/traces$suffix.tar.gz" -C "$WORK" traces
        if (($(stat -c %s "$OUT/traces$suffix.tar.gz") > 15 * 1024 * 1024)); then  # the tool returns 16 MiB a file
            tar -czf "$OUT/traces$suffix.tar.gz" -C "$WORK" $(cd "$WORK" && ls traces/*fp32*.json)
        fi
    fi
    echo
    cat "$WORK/status.md"
    [ -f "$WORK/RESULTS-gpu.md" ] && grep -v '^- \(trace\|skipped\)' "$WORK/RESULTS-gpu.md"
    ls -la "$OUT"
}

case $PART in
1) part1; finish -part1 ;;
2) part2; finish -part2 ;;
all) BUDGET=$((BUDGET * 2)); part1; part2; finish "" ;;
*) echo "usage: OUT=folder $0 [1|2]" >&2; exit 2 ;;
esac
