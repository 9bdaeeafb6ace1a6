#!/usr/bin/env bash
# GPU smoke test: every tiny config fits a few steps in bf16-mixed on one CUDA device, then SimVP under DDP on one
# GPU (the DDP code path: process group, DistributedSampler, synced metrics). Prints one line per run and the run
# folder; exits non-zero when a run fails. Without a CUDA device it says so and exits 0 (nothing to check).
#   bash bench/gpu_smoke.sh        (or: make gpu-smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: no CUDA device visible to torch (torch.cuda.is_available() is False): nothing run."
    exit 0
fi

WORK=$(mktemp -d -t satdiff-gpu-smoke-XXXXXX)
"$PY" -m datamodules.synthetic.geobench "$WORK/geobench" >/dev/null
FIT=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --trainer.max_epochs 1
     --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 --trainer.logger false
     --trainer.enable_progress_bar false --trainer.enable_model_summary false)
failed=()

run() {  # run NAME ARGS...: one fit, its log in the run folder
    local name=$1
    shift
    local folder="$WORK/runs/$name"
    mkdir -p "$folder"
    local started=$SECONDS
    if "$PY" -m lightning_cli fit "$@" "${FIT[@]}" --trainer.default_root_dir "$folder" >"$folder.log" 2>&1; then
        echo "ok    $name ($((SECONDS - started)) s)  $folder"
    else
        echo "FAIL  $name ($((SECONDS - started)) s)  log: $folder.log"
        tail -n 5 "$folder.log" | sed 's/^/      /'
        failed+=("$name")
    fi
}

for config in persistence simvp predrnn forecast; do
    run "$config-bf16" --config "configs/tiny/$config.yaml" --data.init_args.root data/demo
done
run difuser_cls-bf16 --config configs/tiny/difuser_cls.yaml --data.init_args.root "$WORK/geobench"
run difuser_seg-bf16 --config configs/tiny/difuser_seg.yaml --data.init_args.root "$WORK/geobench"
run simvp-ddp-1gpu --config configs/tiny/simvp.yaml --data.init_args.root data/demo --trainer.strategy ddp

if ((${#failed[@]})); then
    echo "gpu_smoke: ${#failed[@]} failed: ${failed[*]}"
    exit 1
fi
echo "gpu_smoke: all runs passed (folders under $WORK/runs)"
