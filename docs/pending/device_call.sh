#!/usr/bin/env bash
# The measurements that decide the pending fused-scan patch, the Pallas depthwise conv and the
# compile-time flags (issue 10): one device call of under 10 minutes per stage. See README.md in
# this folder.
#
# Before (here, once): apply the patch to a copy and put the copy where the call carries it:
#   git worktree add /tmp/p HEAD && git -C /tmp/p apply docs/pending/fused_scan_direction_groups.patch
#   mkdir -p .devtree/p && cp -r /tmp/p/vcmamba_jax /tmp/p/scripts .devtree/p/
#   (and the Python 3.12 wheels in .whl, as the device tool's README says)
# Then, device `run` with carry [".whl", ".devtree"] and timeout_s 598:
#   bash docs/pending/device_call.sh dw        # ~9 min: B's train and eval steps on main, then
#                                              # with depthwise_impl=pallas
#   bash docs/pending/device_call.sh kernels   # ~8 min: scan sweep, Pallas dw checks, FFN blocks
#   bash docs/pending/device_call.sh step '{"group": 1}'  # ~9 min: B main vs patched, that setting
#   bash docs/pending/device_call.sh compile   # ~9 min: B's cold train-step compile, XLA flags
#   TOTAL=290 bash docs/pending/device_call.sh fused2  # ~5 min: the fused inference conv's
#                                              # checks and tiles; eval-only B, S, M fused/unfused
# B's benchmark takes over 140 s from a cold compilation cache on an H100 (2026-12-07: a
# train-only run was cut at 140 s and the call measured nothing), so every B run here has 180-260
# s, and no two stages fit one call.
set -u
export PYTHONUNBUFFERED=1
if [[ "${1:-}" != kernels && "${1:-}" != step && "${1:-}" != compile && "${1:-}" != dw && "${1:-}" != decide && "${1:-}" != blocks && "${1:-}" != threefry && "${1:-}" != init && "${1:-}" != smb && "${1:-}" != patch_blocks && "${1:-}" != fused2 && "${1:-}" != train2 && "${1:-}" != s24 && "${1:-}" != s25 && "${1:-}" != s25b && "${1:-}" != s25c && "${1:-}" != lean && "${1:-}" != s26 && "${1:-}" != s26b && "${1:-}" != s27 && "${1:-}" != s27b && "${1:-}" != s27c ]]; then
  echo "usage (from the repo root): bash docs/pending/device_call.sh dw | kernels | step '<KernelConfig JSON>' | compile" >&2
  exit 2
fi
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
ROOT=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/p
cp -r "$ROOT"/.devtree/p/vcmamba_jax "$ROOT"/.devtree/p/scripts /tmp/p/ || exit 1
if [[ -d "$ROOT"/.devtree/base ]]; then  # a reference tree (e.g. the last commit), for decide
  mkdir -p /tmp/base && cp -r "$ROOT"/.devtree/base/vcmamba_jax "$ROOT"/.devtree/base/scripts /tmp/base/
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
start=$(date +%s)
elapsed() { echo "$1 rc=$2 $(( $(date +%s) - start ))s" | tee -a "$OUT/env.txt"; }
main_py() { PYTHONPATH=$ROOT:/tmp/site "$@"; }
summary() { grep -hE '_synthetic|compile|Pallas|fall|rror' "$@" | grep -vE '^[IWE][0-9]{4} ' | cut -c1-160; }
# XLA's own timing of its compile phases and passes (VLOG lines in the run's log; PASSLOG=1).
xla_timers() { echo TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1,gpu_compiler=1,compile_module_to_llvm_ir=1; }
patched_py() { (cd /tmp/p && PYTHONPATH=/tmp/p:/tmp/site "$@"); }
base_py() { (cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/site "$@"); }
B_FLAGS="--config=vcmamba_jax/configs/vcmamba_b.py --config.model.dtype=bfloat16 \
  --config.distillation.type=none --config.global_batch_size=128 --config.eval_batch_size=256 \
  --modes=train_synthetic,eval_synthetic"
# bench NAME TREE LIMIT [FLAG...]: B's benchmark ($RUN, default scripts/benchmark.py, with B_FLAGS
# and then FLAGs; a later --modes wins) on TREE (main_py | base_py | patched_py), from an empty
# compilation cache of its own, for at most LIMIT seconds; NAME.log and NAME.json in $OUT.
bench() {
  local name=$1 tree=$2 limit=$3
  shift 3
  # shellcheck disable=SC2086
  $tree env ${PASSLOG:+$(xla_timers)} JAX_COMPILATION_CACHE_DIR=/tmp/cache_$name timeout "$limit" python3 \
    ${RUN:-scripts/benchmark.py} $B_FLAGS "$@" --json_out="$OUT/$name.json" > "$OUT/$name.log" 2>&1
  elapsed "$name" $?
}

# check_scan LIMIT: the fused scan's GPU checks against the sequential scan (check_scan.log).
check_scan() {
  main_py timeout "$1" python3 scripts/check_kernels.py --model vcmamba_b --skip_timing \
    --only scan > "$OUT/check_scan.log" 2>&1
  elapsed check_scan $?
  grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_scan.log" | cut -c1-130
}
# left_s TOTAL_DEFAULT: seconds left of this call's TOTAL.
left_s() { echo $(( ${TOTAL:-$1} - $(date +%s) + start )); }
# scan_launch SECONDS SETTING...: B's fused scan at each launch setting (scan_launch.log).
scan_launch() {
  local limit=$1
  shift
  main_py timeout "$limit" python3 scripts/benchmark_scan.py --model vcmamba_b --batch 128 \
    --impls fused --skip_model --fused_blocks "$@" > "$OUT/scan_launch.log" 2>&1
  elapsed scan_launch $?
  grep '^scan' "$OUT/scan_launch.log"
}
# ffn_variants SECONDS [VARIANTS]: B's FFN blocks at each variant of ffn_block_variants.py
# (default 0-2: the taps kernel gradient's formulations; blocks.json).
ffn_variants() {
  main_py timeout "$1" python3 docs/pending/ffn_block_variants.py --batch 128 \
    --variants "${2:-0,1,2}" --json "$OUT/blocks.json" > "$OUT/blocks.log" 2>&1
  elapsed blocks $?
  grep '^{' "$OUT/blocks.log" | cut -c1-400
}

case "${1:-}" in
  kernels)
    main_py timeout 50 python3 scripts/benchmark_scan.py --model vcmamba_b --batch 128 \
      --impls fused --skip_model > "$OUT/scan_main.log" 2>&1
    elapsed scan_main $?
    grep -v '^[EWI][0-9]' "$OUT/scan_main.log" | tail -5
    patched_py timeout 110 python3 "$ROOT/docs/pending/scan_sweep.py" --batch 128 \
      --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
    elapsed sweep $?
    grep -E '^\{|^null' "$OUT/sweep.log"
    main_py timeout 110 python3 scripts/check_kernels.py --model vcmamba_b --skip_timing \
      --only pallas > "$OUT/check_pallas.log" 2>&1
    elapsed check_pallas $?
    grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_pallas.log" | cut -c1-110
    main_py timeout 240 python3 docs/pending/ffn_block_variants.py --batch 128 \
      --json "$OUT/blocks.json" > "$OUT/blocks.log" 2>&1
    elapsed blocks $?
    grep '^{' "$OUT/blocks.log" | cut -c1-400
    ;;
  step)
    bench b_main main_py 200
    setting=${2:-'{}'}
    RUN="$ROOT/docs/pending/run_with_kernel_config.py ${setting// /} scripts/benchmark.py" \
      bench b_patched patched_py 220
    summary "$OUT"/b_*.log
    ;;
  dw)
    # Train and eval: in inference 'auto' runs cuDNN's depthwise conv, impl 'pallas' the Pallas
    # forward. The Pallas depthwise GPU checks run in the `kernels` stage.
    bench b_main main_py 235
    bench b_dw main_py 235 --config.model.depthwise_impl=pallas
    # Then both: 'pallas' and BatchNorm's other statistics in one pass (run_with_one_pass_bn.py),
    # in what time is left.
    RUN="docs/pending/run_with_one_pass_bn.py scripts/benchmark.py" \
      bench b_bn1 main_py $(( 585 - $(date +%s) + start )) --config.model.depthwise_impl=pallas
    summary "$OUT"/b_*.log
    ;;
  blocks)
    # A short call: one FFN block of each stage of B, 'taps' against 'pallas' (default launch,
    # then two others), in one process, then the Pallas kernels' GPU checks.
    main_py timeout 120 python3 docs/pending/ffn_block_variants.py --batch 128 \
      --variants 0,5,7 --json "$OUT/blocks.json" > "$OUT/blocks.log" 2>&1
    elapsed blocks $?
    grep '^{' "$OUT/blocks.log" | cut -c1-400
    main_py timeout 120 python3 scripts/check_kernels.py --model vcmamba_b --skip_timing \
      --only pallas > "$OUT/check_pallas.log" 2>&1
    elapsed check_pallas $?
    grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_pallas.log" | cut -c1-110
    ;;
  decide)
    # LEAN=1: train steps only (no eval compile), for a call with little device time left.
    if [[ "${LEAN:-0}" == 1 ]]; then B_FLAGS="$B_FLAGS --modes=train_synthetic"; fi
    # One call that decides the Pallas depthwise conv and scan_blocks: B on the reference tree
    # (.devtree/base) with XLA's compile phases timed, then the working tree with
    # depthwise_impl=pallas, the Pallas kernels' GPU checks, then the working tree with
    # scan_blocks (in what time is left).
    PASSLOG=1 bench b_main base_py "${LIMIT:-200}"
    grep -E 'RunHloPasses|RunBackend' "$OUT/b_main.log" | cut -c1-200
    bench b_dw main_py "${LIMIT:-200}" --config.model.depthwise_impl=pallas
    main_py timeout 90 python3 scripts/check_kernels.py --model vcmamba_b --skip_timing \
      --only pallas > "$OUT/check_pallas.log" 2>&1
    elapsed check_pallas $?
    bench b_scan main_py $(( 590 - $(date +%s) + start )) --config.model.scan_blocks=true
    summary "$OUT"/b_*.log
    grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_pallas.log" | cut -c1-110
    ;;
  threefry)
    # B's train step (train only) on main, then with JAX's threefry lowered to its GPU kernel
    # (jax_threefry_gpu_kernel_lowering: the same bits, compiled as one kernel per draw instead of
    # expanded HLO; deviceless it cut the init program's compile 47 -> 8 s and the train step's
    # 70 -> 52 s), then the scan patch, in what time is left.
    B_FLAGS="$B_FLAGS --modes=train_synthetic"
    bench b_main main_py "${LIMIT:-150}"
    JAX_THREEFRY_GPU_KERNEL_LOWERING=1 bench b_tk main_py "${LIMIT:-150}"
    main_py timeout 60 python3 scripts/check_kernels.py --skip_timing --only threefry \
      > "$OUT/check_threefry.log" 2>&1
    elapsed check_threefry $?
    left=$(( ${TOTAL:-540} - $(date +%s) + start ))
    if (( left >= 120 )); then
      RUN="$ROOT/docs/pending/run_with_kernel_config.py {} scripts/benchmark.py" \
        bench b_patched patched_py "$left"
    fi
    summary "$OUT"/b_*.log
    grep -h 'set up' "$OUT"/b_*.log | cut -c1-160
    grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_threefry.log" | cut -c1-160
    ;;
  init)
    # Time to the first train step, B (train only): the reference tree (.devtree/base, XLA's
    # threefry in the init program) against main (threefry GPU kernels in the init program), on
    # the same machine. Does the init's cut show up in the time to the first step, or does the
    # train step's compile (the first big one in the process after it) take it back?
    B_FLAGS="$B_FLAGS --modes=train_synthetic"
    bench b_base base_py "${LIMIT:-140}"
    bench b_main main_py "${LIMIT:-140}"
    # Then the scan patch (train only, default launch settings), in what time is left.
    left=$(( ${TOTAL:-560} - $(date +%s) + start ))
    if (( left >= 120 )); then
      RUN="$ROOT/docs/pending/run_with_kernel_config.py {} scripts/benchmark.py" \
        bench b_patched patched_py "$left"
    fi
    summary "$OUT"/b_*.log
    grep -h 'set up' "$OUT"/b_*.log | cut -c1-160
    ;;
  patch_blocks)
    # B's train step (train only) on main (remat_mlp 'fc2_input'), with remat_mlp 'none', then on
    # the scan patch (default launch settings); then
    # one FFN block of each stage of B: 'taps', then 'pallas' without and with Triton's software
    # pipelining of the row loop (LaunchConfig.num_stages), in what time is left.
    # First main's fused scan at B's shapes with Triton's software pipelining (num_stages 1-4).
    main_py timeout 60 python3 scripts/benchmark_scan.py --model vcmamba_b --batch 128 \
      --impls fused --fused_blocks 64,32,2 64,32,3 64,32,4 --skip_model > "$OUT/scan_stages.log" 2>&1
    elapsed scan_stages $?
    B_FLAGS="$B_FLAGS --modes=train_synthetic"
    bench b_main main_py "${LIMIT:-140}"
    bench b_none main_py "${LIMIT:-140}" --config.model.remat_mlp=none
    left=$(( ${TOTAL:-575} - $(date +%s) + start ))
    if (( left >= 115 )); then
      RUN="$ROOT/docs/pending/run_with_kernel_config.py {} scripts/benchmark.py" \
        bench b_patched patched_py "$(( left < ${LIMIT:-140} ? left : ${LIMIT:-140} ))"
    fi
    left=$(( ${TOTAL:-575} - $(date +%s) + start ))
    if (( left >= 40 )); then
      main_py timeout "$left" python3 docs/pending/ffn_block_variants.py --batch 128 \
        --variants 12,5,10 --json "$OUT/blocks.json" > "$OUT/blocks.log" 2>&1
      elapsed blocks $?
    fi
    summary "$OUT"/b_*.log
    grep -h 'set up' "$OUT"/b_*.log | cut -c1-160
    grep '^{' "$OUT/blocks.log" | cut -c1-300
    grep '^scan' "$OUT/scan_stages.log"
    ;;
  s27)
    # Decides session 27's changes on one machine (train only, each from its own cold cache):
    # main (its Pallas depthwise kernels now multiply-add in one PTX instruction: -22 to -35%
    # instructions, deviceless); the kernels as before (LaunchConfig fma=false);
    # ops.FUSE_BN_BACKWARD (norm1's sums in the depthwise backward kernel; deviceless -4.4 GB
    # moved); remat_scan=false (the fused scan's forward runs once, its state checkpoints kept:
    # deviceless -1.8 GB, -4 scan kernels of ~0.56 ms, +0.76 GiB).
    # First the GPU checks of the fused scan and of the Pallas depthwise kernels at stage 1 and
    # the mixer's 7x7 (their multiply-adds are inline PTX `fma.rn.f32` since session 27; the
    # interpreter cannot run it).
    main_py timeout 60 python3 scripts/check_kernels.py --model vcmamba_b --skip_timing \
      --only '3x3 pallas vs lax.conv 56x56,fused bn backward vs lax.conv 56x56,7x7 pallas,scan' \
      > "$OUT/check_quick.log" 2>&1
    elapsed check_quick $?
    grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_quick.log" | cut -c1-150
    B_FLAGS="$B_FLAGS --modes=train_synthetic"
    fused="docs/pending/run_with_kernel_config.py --fuse_bn_backward --depthwise {}"
    bench b_main main_py "${LIMIT:-130}"
    RUN="docs/pending/run_with_kernel_config.py --depthwise {\"fma\":false} scripts/benchmark.py" \
      bench b_nofma main_py "${LIMIT:-130}"
    RUN="$fused scripts/benchmark.py" bench b_fused main_py "${LIMIT:-130}"
    left=$(left_s 590)
    if (( left >= 100 )); then
      bench b_noremat main_py "$left" --config.model.remat_scan=false
    fi
    summary "$OUT"/b_*.log
    ;;
  s27b)
    # The Pallas depthwise kernels' GPU checks at the tile-sum defaults (every case; s26's 80 s
    # cut the bf16 ones of stages 3-4 and the eval kernel) and of norm1's sums in the conv's
    # backward (ops.FUSE_BN_BACKWARD); the fused scan with and without PTX multiply-adds; B's
    # FFN blocks (remat as in the model): the Pallas kernels without PTX multiply-adds (as
    # before session 27), main's Pallas, fused, fused with 8 backward warps (no spills),
    # BatchNorm's sums as a Pallas kernel (ops.PALLAS_BN_SUMS), that and fused; then S's and
    # M's eval in what is left.
    main_py timeout 170 python3 scripts/check_kernels.py --model vcmamba_b --skip_timing \
      --only pallas,sums > "$OUT/check_pallas.log" 2>&1
    elapsed check_pallas $?
    grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_pallas.log" | cut -c1-150
    scan_launch 60 32,16,3,1,1,1 32,16,3,1,1,0  # the fused scan with / without PTX fma
    main_py timeout 170 python3 docs/pending/ffn_block_variants.py --batch 128 \
      --remat_mlp fc2_input --variants 16,5,13,14,17,18 --json "$OUT/blocks.json" \
      > "$OUT/blocks.log" 2>&1
    elapsed blocks $?
    grep '^{' "$OUT/blocks.log" | cut -c1-400
    for v in s m; do
      left=$(left_s 585)
      if (( left >= 60 )); then
        B_FLAGS=${B_FLAGS/vcmamba_b.py/vcmamba_$v.py} bench "$v" main_py "$left" \
          --modes=eval_synthetic
      fi
    done
    summary "$OUT"/[sm].log
    ;;
  s27c)
    # A profile of B's train step (the next target; the Pallas depthwise kernels now have a
    # category of their own), then B's train and eval steps in what is left.
    main_py env JAX_COMPILATION_CACHE_DIR=/tmp/cache_prof timeout 200 python3 \
      scripts/profile_step.py ${B_FLAGS%--modes*} --modes=train --top=40 --dump_hlo \
      --json_out="$OUT/profile_train.json" > "$OUT/profile_train.log" 2>&1
    elapsed profile_train $?
    grep -vE '^[IWE][0-9]{4} ' "$OUT/profile_train.log" | head -90 | cut -c1-170
    bench b main_py "$(left_s 585)"
    summary "$OUT"/b.log
    ;;
  smb)
    # README "Speed" (an H200): B on main (train and eval), the eval step's kernels (is BatchNorm +
    # GELU fused into the GEMMs in inference?), B's eval with the Pallas depthwise forward, then S
    # and M, each benchmark from its own cold cache, in what time is left.
    bench b main_py "${LIMIT:-180}"
    main_py timeout 90 python3 scripts/profile_step.py ${B_FLAGS%--modes*} --modes=eval --top=40 \
      --dump_hlo --json_out="$OUT/profile_eval.json" > "$OUT/profile_eval.log" 2>&1
    elapsed profile_eval $?
    bench b_dw_eval main_py 90 --modes=eval_synthetic --config.model.depthwise_impl=pallas
    for v in s m; do
      left=$(( ${TOTAL:-580} - $(date +%s) + start ))
      if (( left >= 100 )); then
        B_FLAGS=${B_FLAGS/vcmamba_b.py/vcmamba_$v.py} bench "$v" main_py "$left"
      fi
    done
    summary "$OUT"/[smb].log "$OUT"/b_dw_eval.log
    ;;
  fused2)
    # The fused inference conv (opt-in, depthwise_impl='pallas'; a first run of this, before its
    # probe was fixed, measured the 'taps' fallback instead): the GPU checks (which FAIL where a
    # kernel is unavailable), the kernel against the unfused ops at B's four stage shapes for
    # several tiles, then eval-only benchmarks (no train compile): main ('auto': cuDNN's conv,
    # then BatchNorm + GELU; the scan's forward without checkpoints) and 'pallas' for B, S, M.
    for only in scan eval; do  # the fused scan (base-2 exponentials), then the fused conv
      main_py timeout 100 python3 scripts/check_kernels.py --model vcmamba_b --skip_timing \
        --only "$only" > "$OUT/check_$only.log" 2>&1
      elapsed "check_$only" $?
      grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_$only.log" | cut -c1-130
    done
    # The fused scan's launch settings at B's shapes (fwd_block,bwd_block,stages,fwd_warps,
    # bwd_warps; one warp: fewer instructions and barriers in the PTX, scan_pallas.py says how
    # many), forward and forward+backward against main's defaults (the first row).
    main_py timeout 90 python3 scripts/benchmark_scan.py --model vcmamba_b --batch 128 \
      --impls fused --skip_model --fused_blocks 32,16,1,1,1 64,16,1,4,1 32,32,1,1,4 \
      16,8,1,1,1 32,16,3,1,1 > "$OUT/scan_launch.log" 2>&1
    elapsed scan_launch $?
    grep '^scan' "$OUT/scan_launch.log"
    main_py timeout 80 python3 docs/pending/eval_conv_tiles.py > "$OUT/tiles.log" 2>&1
    elapsed tiles $?
    grep '^{' "$OUT/tiles.log"
    B_FLAGS="$B_FLAGS --modes=eval_synthetic"
    for v in b s m; do
      for impl in auto pallas; do
        left=$(( ${TOTAL:-560} - $(date +%s) + start ))
        if (( left >= 50 )); then
          B_FLAGS=${B_FLAGS/vcmamba_b.py/vcmamba_$v.py} bench "${v}_$impl" main_py \
            "$(( left < 80 ? left : 80 ))" --config.model.depthwise_impl=$impl
        fi
      done
    done
    grep -h 'unavailable' "$OUT"/*.log | cut -c1-200 | sort | uniq -c
    summary "$OUT"/[bsm]_*.log
    ;;
  s24)
    # Session 24: the fused scan's GPU checks (base-2 exponentials, the backward's reuse of the
    # recomputed chunk, the forward without checkpoints), B's train and eval steps on main
    # (drop-path noise in one draw, one Beta loop: deviceless, the train step compiles in 52-64 s
    # against 83-88 s at 980b88e), then in what time is left the scan's launch settings at B's
    # shapes (one warp: fewer instructions and barriers in the PTX), eval-only M and S, and the
    # taps kernel gradient's formulations.
    check_scan 100
    bench b main_py "${LIMIT:-230}"
    left=$(left_s 575)
    if (( left >= 45 )); then
      scan_launch "$(( left < 90 ? left : 90 ))" 32,16,1,1,1 64,16,1,4,1 32,32,1,1,4 16,8,1,1,1 \
        32,16,3,1,1
    fi
    B_FLAGS="$B_FLAGS --modes=eval_synthetic"
    for v in m s; do
      left=$(left_s 575)
      if (( left >= 50 )); then
        B_FLAGS=${B_FLAGS/vcmamba_b.py/vcmamba_$v.py} bench "${v}_eval" main_py \
          "$(( left < 80 ? left : 80 ))"
      fi
    done
    left=$(left_s 575)
    if (( left >= 60 )); then
      ffn_variants "$left"
    fi
    summary "$OUT"/[bsm]*.log
    grep -h 'set up' "$OUT"/b.log | cut -c1-160
    ;;
  s26)
    # Session 26: the Pallas depthwise kernels' GPU checks (now reading and writing unpadded
    # arrays with masked tiles), then the kernels at rows-per-program chunks and launch settings
    # against main's taps (B's FFN blocks, fwd+bwd), then B's train step with depthwise_impl=pallas
    # at the fastest of those settings, then main's (fc1's pre-bias output saved for the backward:
    # deviceless -2 GB moved) in what time is left.
    main_py timeout 80 python3 scripts/check_kernels.py --model vcmamba_b --skip_timing \
      --only pallas > "$OUT/check_pallas.log" 2>&1
    elapsed check_pallas $?
    grep -E '^(ok|FAIL)|passed|FAILED' "$OUT/check_pallas.log" | cut -c1-130
    ffn_variants 200 12,5,6,7,8,9,10,11
    SETTING=$(python3 -c "
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r['variant'].get('impl') == 'pallas']
print(json.dumps(min(rows, key=lambda r: r['ffn_blocks_of_b_ms'])['variant'].get('launch', {})))
" "$OUT/blocks.json" 2>/dev/null || echo '{}')
    echo "fastest pallas setting: $SETTING" | tee -a "$OUT/env.txt"
    left=$(left_s 470)
    RUN="$ROOT/docs/pending/run_with_kernel_config.py --depthwise ${SETTING// /} scripts/benchmark.py" \
      bench b_pallas main_py "$(( left < 150 ? left : 150 ))" --modes=train_synthetic \
      --config.model.depthwise_impl=pallas
    left=$(left_s 470)
    if (( left >= 100 )); then
      bench b main_py "$left" --modes=train_synthetic
    fi
    summary "$OUT"/b*.log
    ;;
  s26b)
    # Session 26, second call: B's train step with depthwise_impl=pallas at the launch setting
    # SETTING (JSON, e.g. '{"rows": 8}'), then B's train step profiled on the working tree.
    RUN="$ROOT/docs/pending/run_with_kernel_config.py --depthwise ${SETTING// /} scripts/benchmark.py" \
      bench b_pallas main_py "${LIMIT:-200}" --modes=train_synthetic \
      --config.model.depthwise_impl=pallas
    summary "$OUT"/b*.log
    left=$(left_s 575)
    if (( left >= 150 )); then
      main_py timeout "$left" python3 scripts/profile_step.py $B_FLAGS --modes=train --top=40 \
        --json_out="$OUT/profile_b.json" > "$OUT/profile_b.log" 2>&1
      elapsed profile_b $?
    fi
    ;;
  s25)
    # Session 25: the fused scan's GPU checks, B's train and eval steps on the working tree (the
    # taps kernel and bias gradients as one reduction, the conv's dx and y rounded behind barriers,
    # one-pass BatchNorm moments, fc1's bias after its matmul: deviceless 131.0 -> 95.4 GB moved),
    # B's train step on .devtree/base (the last commit before it) on the same machine, then the
    # scan's launch settings and the FFN-block variants in what time is left.
    check_scan 100
    bench b main_py "${LIMIT:-200}"
    bench b_base base_py "${LIMIT:-200}" --modes=train_synthetic
    left=$(left_s 575)
    if (( left >= 45 )); then
      scan_launch "$(( left < 90 ? left : 90 ))" 32,16,1,1,1 64,16,1,4,1 32,32,1,1,4 16,8,1,1,1 \
        32,16,3,1,1
    fi
    left=$(left_s 575)
    if (( left >= 60 )); then
      ffn_variants "$left"
    fi
    summary "$OUT"/[bsm]*.log
    grep -h 'set up' "$OUT"/b*.log | cut -c1-160
    ;;
  s25b)
    # Session 25, second call: B's train step on the working tree and on .devtree/p (the same with
    # the taps kernel gradient as separate sums again and the scan at 32/16 channels, one warp,
    # 3 stages: fastest in s25's launch sweep), then .devtree/p's eval step.
    bench b main_py "${LIMIT:-150}" --modes=train_synthetic
    bench b_p patched_py "${LIMIT:-150}"
    summary "$OUT"/b*.log
    ;;
  s25c)
    # Session 25, third call: B's train step on .devtree/base (the working tree with s25b's scan
    # launch settings, the kernel gradient stacked) against s25b's .devtree/p.
    bench b_s base_py "${LIMIT:-150}" --modes=train_synthetic
    summary "$OUT"/b*.log
    ;;
  lean)
    # For a call with ~4 minutes: the fused scan's GPU checks, B's eval step (eval only: no train
    # compile), then the scan's launch settings, in what time is left.
    check_scan 90
    B_FLAGS="$B_FLAGS --modes=eval_synthetic"
    bench b_eval main_py 75
    left=$(left_s 200)
    if (( left >= 30 )); then
      scan_launch "$left" 32,16,1,1,1 64,16,1,4,1 16,8,1,1,1
    fi
    summary "$OUT"/b_eval.log
    ;;
  train2)
    # After fused2: B's train and eval steps on main (train img/s and the peak on this card), S's
    # eval step profiled (S with cuDNN's conv once ran at 8,195 img/s on an H200, 18,443 on an
    # H100), then the scan patch's train step, in what time is left.
    bench b main_py "${LIMIT:-200}"
    main_py timeout 90 python3 scripts/profile_step.py \
      --config=vcmamba_jax/configs/vcmamba_s.py --config.model.dtype=bfloat16 \
      --config.distillation.type=none --config.eval_batch_size=256 --modes=eval --top=25 \
      --json_out="$OUT/profile_s_eval.json" > "$OUT/profile_s_eval.log" 2>&1
    elapsed profile_s_eval $?
    left=$(( ${TOTAL:-575} - $(date +%s) + start ))
    if (( left >= 120 )); then
      B_FLAGS="$B_FLAGS --modes=train_synthetic"
      RUN="$ROOT/docs/pending/run_with_kernel_config.py {} scripts/benchmark.py" \
        bench b_patched patched_py "$left"
    fi
    summary "$OUT"/b*.log
    grep -h 'set up' "$OUT"/b*.log | cut -c1-160
    ;;
  compile)
    # Issue 10 wants B's train step compiled cold in <= 60 s (76 s on an H200, 2026-12-02). Where
    # does it go? Autotuning (cuDNN/cuBLAS algorithms, Triton GEMM fusions) is the usual suspect:
    # each run is main's step from an empty cache under one flag set; it reports the compile time
    # and the step time, so a flag that costs speed shows.
    i=0
    for flags in "" "--xla_gpu_autotune_level=0" "--xla_gpu_enable_triton_gemm=false"; do
      i=$((i + 1))
      # shellcheck disable=SC2086
      XLA_FLAGS="$flags" JAX_COMPILATION_CACHE_DIR=/tmp/cache_c$i main_py timeout 180 python3 \
        scripts/benchmark.py ${B_FLAGS%--modes*} --modes=train_synthetic --steps=10 \
        --json_out="$OUT/compile_$i.json" > "$OUT/compile_$i.log" 2>&1
      elapsed "compile_$i [$flags]" $?
      grep -E 'train_synthetic|compile' "$OUT/compile_$i.log" | tail -n 2
    done
    ;;
esac
