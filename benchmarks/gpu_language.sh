#!/usr/bin/env bash
# The GPU measurements that issue 28 asks of the language folders, in one run on one GPU: what the
# folder READMEs report as "not measured" on a GPU until someone runs this.
#
#   bash benchmarks/gpu_language.sh DATA_DIR LOG_DIR [SECONDS]     # SECONDS: the time it may take (540)
#   DRY=1 bash benchmarks/gpu_language.sh DATA_DIR LOG_DIR         # print the commands, run nothing
#
# DATA_DIR needs text/1984.txt, names/names.txt and tatoeba/fra-eng.zip (the layout of --data-dir).
# Most important first; each command gets a time limit and is skipped when less than that is left,
# so a run cut short still holds the first ones. Each writes LOG_DIR/<name>.log; LOG_DIR/summary.txt
# lists every command with its exit status and seconds.
set -u
DATA=$(realpath -m "${1:?usage: gpu_language.sh DATA_DIR LOG_DIR [SECONDS]}")
LOGS=$(realpath -m "${2:?usage: gpu_language.sh DATA_DIR LOG_DIR [SECONDS]}")
BUDGET=${3:-540}
export PYTHONUNBUFFERED=1                          # a command stopped at its limit keeps what it printed
cd "$(dirname "$0")/.." || exit 1
if [ -z "${DRY:-}" ]; then
  mkdir -p "$LOGS" || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.txt" 2>&1
  python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$LOGS/gpu.txt" 2>&1
fi
start=$SECONDS

run() {  # NAME SECONDS COMMAND...
  local name=$1 limit=$2 left=$((BUDGET - (SECONDS - start))) t0=$SECONDS rc
  shift 2
  if [ -n "${DRY:-}" ]; then echo "$name ($limit s): $*"; return; fi
  if ((left < limit)); then echo "$name: skipped, $left s left: $*" | tee -a "$LOGS/summary.txt"; return; fi
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s: $*" | tee -a "$LOGS/summary.txt"
}

# the first number for each goal, then the rest
# gpt: where the default model's step goes (kernels, GPU busy share), compiled as by default and with CUDA graphs
run gpt-compiled 90 python gpt/main.py --benchmark --profile --data-dir "$DATA"
run gpt-cuda-graphs 120 python gpt/main.py --benchmark --profile --compile-mode reduce-overhead --data-dir "$DATA"
# lm_compression: the coder on 1 MiB of the novel (the goal: >= 50 kB/s each way)
run coder-1MiB 150 python lm_compression/main.py benchmark-coder "$DATA/text/1984.txt" --pretrained
# translator: the default model's step (x 20,000 steps: the default run's training time)
run translator-bench 90 python translator/main.py --benchmark --data-dir "$DATA"
# sequence_models: 3 epochs of names (the first compiles the recurrent step; the goal is the later ones)
run names-3-epochs 90 python sequence_models/main.py --task names --epochs 3 --data-dir "$DATA" \
  --out-dir "$LOGS/names"
# tiny_stories_lm: the GPU preset's step (random batches unless the full corpus is in DATA_DIR)
run tiny-stories-gpu 120 python tiny_stories_lm/main.py --preset gpu --benchmark --data-dir "$DATA"
# then: gpt's 12-layer 768-wide model, the shipped translator's evaluation (beam search batched over the
# test set), the compiled coder, gpt eager, and gpt training with CUDA graphs
run gpt-12x768 150 python gpt/main.py --benchmark --n-layer 12 --n-head 12 --n-embd 768 --data-dir "$DATA"
run translator-evaluate 120 python translator/main.py evaluate --pretrained --data-dir "$DATA" --out-dir "$LOGS/tr"
run coder-256kB-compiled 120 python lm_compression/main.py benchmark-coder "$DATA/text/1984.txt" --pretrained \
  --bytes 262144 --compile
run gpt-eager 40 python gpt/main.py --benchmark --no-compile --data-dir "$DATA"
run gpt-train-cuda-graphs 150 python gpt/main.py --steps 1000 --compile-mode reduce-overhead --data-dir "$DATA" \
  --out-dir "$LOGS/gpt-run"
exit 0
