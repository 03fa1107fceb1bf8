#!/usr/bin/env bash
# Every GPU measurement the project asks for, in one command of about 8 minutes.
#
#   bash benchmarks/gpu.sh OUTDIR                    a machine with a GPU and the project's packages
#   bash benchmarks/gpu.sh --wheels DIR OUTDIR       the same, installing what is missing from the
#                                                    wheels in DIR first (no network needed)
#   bash benchmarks/gpu.sh --smoke OUTDIR            every step at a tiny size, on a CPU (about
#                                                    2 minutes; the slow test suite runs it)
#   bash benchmarks/gpu.sh --fetch-wheels DIR        on a machine with the package index: download
#                                                    into DIR the wheels that a GPU image without
#                                                    grain, tfds and ml_collections needs (Python 3.12)
#
# It runs, from the repository it lives in (no install: the repository goes on PYTHONPATH), each
# step under its own time limit so that one hung step cannot take the others' time:
#   losses.json          benchmarks/losses.py: the relational loss, naive, blocked (xla) and Pallas,
#                        N = 32,768 and 131,072, bf16, forward + backward, peak memory;
#   train_step.json      benchmarks/train_step.py: the `ptv3_base`, `minkunet34c` and
#                        `waffleiron48_768` steps at batch 16, packed, scans/s, peak memory, MFU;
#   input_pipeline.json  benchmarks/input_pipeline.py: scans/s per thread count (1 to the cores), on
#                        a synthetic world at 0.1 m, compared with the step's scans/s;
#   teacher.json         benchmarks/teacher.py: CLIP ViT-B/16's images/s (dense features, bf16);
#   gpu.log              every command, its output, its exit status and its seconds; nvidia-smi.
# The exit status is that of the first step that failed (0 when none did); the others still run.
set -uo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

smoke=0
wheels=""
fetch=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    --fetch-wheels) fetch="${2:?--fetch-wheels needs a folder}"; shift 2 ;;
    -h | --help) usage ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
repo="$(cd "$(dirname "$0")/.." && pwd)"

# The project's dependencies that the GPU image lacks, with theirs (the image has jax, flax, optax,
# orbax, numpy, scipy, absl, etils, protobuf, pyarrow, psutil, tqdm, regex, tokenizers, pillow).
MISSING=(grain array-record dm-tree tensorflow-datasets tensorflow-metadata googleapis-common-protos
  immutabledict simple-parsing docstring-parser termcolor toml portpicker ml-collections tensorboardX
  ftfy wcwidth importlib-resources)
# Published as source only, and pure Python: built into a wheel here.
SOURCE_ONLY=(promise)

if [[ -n "$fetch" ]]; then
  mkdir -p "$fetch" || exit 3
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64 any; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$fetch" "${MISSING[@]}" || exit 2
  python3 -m pip wheel --quiet --no-deps -w "$fetch" "${SOURCE_ONLY[@]}" || exit 2
  echo "gpu.sh: $(compgen -G "$fetch/*.whl" | wc -l) wheels in $fetch"
  exit 0
fi

[[ $# -eq 1 ]] || usage
if [[ -n "$wheels" ]] && ! compgen -G "$wheels/*.whl" >/dev/null; then
  echo "error: no wheels in $wheels (make them with --fetch-wheels $wheels)" >&2
  exit 2
fi
out="$1"
mkdir -p "$out" || { echo "error: cannot create the output folder $out" >&2; exit 3; }
out="$(cd "$out" && pwd)"
log="$out/gpu.log"
: >"$log"

if [[ -n "$wheels" ]]; then
  site="$(mktemp -d)/site"
  python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl \
    >>"$log" 2>&1 || { echo "error: installing the wheels of $wheels failed (see $log)" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

status=0
# step NAME LIMIT_S COMMAND...: runs one measurement, logged, under its time limit.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS rc
  echo "== $name: $*" | tee -a "$log"
  (cd "$repo" && timeout --kill-after=10 "$limit" "$@") >>"$log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
}

{ nvidia-smi 2>&1 || echo "nvidia-smi: none (no NVIDIA GPU)"; } >>"$log"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" >>"$log" 2>&1

if [[ $smoke -eq 1 ]]; then
  step losses 120 python3 benchmarks/losses.py --smoke --out "$out/losses.json"
  step train_step 300 python3 benchmarks/train_step.py --smoke --model point_encoder,minkunet,waffleiron \
    --noencoder --out "$out/train_step.json"
  step input_pipeline 180 python3 benchmarks/input_pipeline.py --smoke --threads 1,2 \
    --train_step_json "$out/train_step.json" --out "$out/input_pipeline.json"
  step teacher 60 python3 benchmarks/teacher.py --smoke --out "$out/teacher.json"
else
  cores="$(nproc)"
  threads="1,2,4"
  for t in 8 16 32; do ((t <= cores)) && threads+=",$t"; done
  step losses 150 python3 benchmarks/losses.py --n 32768,131072 --dtypes bfloat16 \
    --methods naive,xla,pallas --repeats 5 --out "$out/losses.json"
  step train_step 240 python3 benchmarks/train_step.py --model ptv3_base,minkunet34c,waffleiron48_768 \
    --batch_size 16 --steps 10 --out "$out/train_step.json"
  step input_pipeline 150 python3 benchmarks/input_pipeline.py --threads "$threads" \
    --scenes 4 --samples_per_scene 8 --batches 4 --train_step_json "$out/train_step.json" \
    --out "$out/input_pipeline.json"
  step teacher 60 python3 benchmarks/teacher.py --teachers clip_b16 --dtype bfloat16 \
    --out "$out/teacher.json"
fi
echo "gpu.sh: results in $out (exit $status)" | tee -a "$log"
exit "$status"
