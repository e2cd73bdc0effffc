#!/usr/bin/env bash
# LLaVA-KD recipe: every stage in order through torchrun (paper Sec. 3: DPT -> SFT -> DFT).
#
#   bash train.sh                      # the toy recipe: offline, CPU, prints the table of the README
#   VISION=... TEACHER_LLM=... STUDENT_LLM=... PT_DATA=... PT_IMAGES=... SFT_DATA=... SFT_IMAGES=... bash train.sh
#   INIT=... TEACHER=... SFT_DATA=... SFT_IMAGES=... bash train.sh     # DFT only: make an existing small LLaVA better
#
# Stopped (a failure, a signal, a kill)? Run the same command: finished stages are skipped, a stopped one resumes
# from its checkpoint. Each stage's whole output: OUT/logs/. Settings (environment variables); with none, the toy.
#   VISION        SigLIP checkpoint dir, e.g. google/siglip-so400m-patch14-384 (or a LLaVA dir: its tower)
#   TEACHER_LLM   teacher LLM dir, e.g. Qwen/Qwen1.5-4B: trained PT -> SFT here first, unless TEACHER is set
#   TEACHER       a trained LLaVA teacher in HF format: the teacher's own training is skipped
#   INIT          an existing small LLaVA in HF format (e.g. llava-hf/llava-interleave-qwen-0.5b-hf): only DFT runs
#   STUDENT_LLM   student LLM dir, e.g. Qwen/Qwen1.5-0.5B
#   PT_DATA       LLaVA-Pretrain JSON (blip_laion_cc_sbu_558k.json);   PT_IMAGES  its image folder
#   SFT_DATA      LLaVA-1.5 mix JSON (llava_v1_5_mix665k.json);         SFT_IMAGES its image root
#                 each of the four a list too: several JSON files (one epoch order over all), and one folder
#                 for all of them or one each, space-separated, e.g. SFT_DATA="mix665k.json more.json"
#   EVAL_DATA     held-out LLaVA JSON for sft and dft (EVAL_IMAGES, default SFT_IMAGES): every loss term on it
#                 every EVAL_EVERY steps (default 200) and at the end, in each log.jsonl; PT_EVAL_DATA
#                 (PT_EVAL_IMAGES, default PT_IMAGES) the same for pt and dpt (docs/eval.md: how to split one off)
#   OUT           where every stage writes its checkpoint (default runs/real, toy: runs/toy)
#   NGPU          processes (default: every GPU, or 1 on a CPU machine)
#   BATCH         per-GPU micro-batch (default 8; the global batch of Table A9 is kept by accumulation)
#   EXTRA         flags for every stage (real recipe: --group_by_length), e.g. "--grad_checkpointing --max_length 4096"
#   FSDP          auto (default): FSDP2 for sft and dft on several processes, DDP for pt and dpt;
#                 1: FSDP2 for every stage; 0: DDP for every stage. `llava_kd.py train ... --plan` prints
#                 a stage's memory a GPU under each, and every stage stops first if its plan does not fit
#   NNODES        nodes (default 1: torchrun --standalone); with more, on every node the same command with
#   NODE_RANK     this node's rank (0 .. NNODES-1), MASTER_ADDR (node 0's address) and MASTER_PORT (default 29500)
#   SEEDS         toy recipe only: student seeds (default "0 1 2")
#   TOY_SEED      toy recipe only: the seed of the toy setup, shared by every student seed (data, tower, LLMs; default 0)
#   PROGRESS_EVERY  toy recipe only: seconds between the lines that say where each chain is (default 20)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}  # the Python to run (the tests give theirs)
NGPU=${NGPU:-$($PYTHON -c "import torch; print(max(torch.cuda.device_count(), 1))")}
if [ "${NNODES:-1}" -gt 1 ]; then  # torchrun's own rendezvous: node 0 listens on MASTER_ADDR:MASTER_PORT
  NODES="--nnodes=$NNODES --node_rank=${NODE_RANK:?set NODE_RANK} --master_addr=${MASTER_ADDR:?set MASTER_ADDR} --master_port=${MASTER_PORT:-29500}"
else
  NODES="--standalone"
fi
FSDP=${FSDP:-auto}; WORLD=$(( NGPU * ${NNODES:-1} ))
if [ -n "${INIT:-}${STUDENT_LLM:-}${TEACHER_LLM:-}${TEACHER:-}${VISION:-}" ]; then
  OUT=${OUT:-runs/real}
else
  OUT=${OUT:-runs/toy}
fi
# One recipe an OUT: a second one is refused (the lock ends with the last process holding it; a few
# seconds for the processes of a recipe just killed to end)
mkdir -p "$OUT/logs"; exec 9>>"$OUT/train.lock"
if flock -w 5 -E 75 9; then
  echo $$ > "$OUT/train.lock"
elif [ $? = 75 ]; then
  echo "error: $OUT is in use by another train.sh (pid $(cat "$OUT/train.lock")): wait for it, or give another OUT" >&2
  exit 1
else
  echo "note: $OUT: its filesystem has no file locks, so a second recipe on it is not refused" >&2
fi
stage() {  # stage NAME FLAGS...: one stage through torchrun, under FSDP2 or DDP
  # torchrun forwards SIGUSR1 too, and waits 15 min (not 30 s) for the workers to checkpoint and exit;
  # processes.py is torchrun without its traceback when a stage fails
  local launch="$PYTHON processes.py $NODES --nproc_per_node=$NGPU" fsdp= out= prev= arg
  launch="$launch --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout=900"
  # FSDP2 (Table A9's ZeRO-3) where a whole LLM trains (sft, dft) on several processes: by the memory
  # plan (--plan) a 4B teacher's SFT on 8 GPUs, checkpointed, is 91 GiB a GPU under DDP, 26 sharded
  if [ "$FSDP" = 1 ] || { [ "$FSDP" = auto ] && [ "$WORLD" -gt 1 ] && [[ $1 == sft || $1 == dft ]]; }; then
    fsdp=--fsdp
  elif [ "$WORLD" = 1 ]; then
    launch=$PYTHON  # one process needs no launcher: torchrun would only add its start-up (~3 s a stage)
  fi
  for arg in "$@"; do [ "$prev" = --out ] && out=$arg; prev=$arg; done
  local log=$OUT/logs/$(echo "${out#"$OUT"/}" | tr / -).log  # every attempt's output, appended
  mkdir -p "$OUT/logs"; touch "$log"; local from=$(( $(stat -c %s "$log") + 1 ))
  # --auto_resume: run again, a stage finished in its --out is skipped, one with a checkpoint resumed.
  # In the background, each signal passed on to it: bash, as a batch script, holds a signal until
  # its foreground child ends (and SIGKILL comes first); the stage takes a repeat as the same request
  PYTHONUNBUFFERED=1 $launch llava_kd.py train --stage "$@" $fsdp --auto_resume >> "$log" 2>&1 &
  local pid=$! rc s
  tail -s 0.1 -c "+$from" -f --pid="$pid" "$log" & local shown=$!  # the output, as it comes
  for s in TERM INT HUP QUIT USR1; do trap "kill -s $s $pid 2>/dev/null || true" "$s"; done
  while :; do  # a signal ends `wait` early (status > 128): wait again until the stage has ended
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - TERM INT HUP QUIT USR1
  wait "$shown" || true
  if [ "$rc" != 0 ]; then  # the stage's own error line, last
    local error=$(tail -c "+$from" "$log" | tr '\r' '\n' | grep -a "^error" | tail -n 1)  # after tqdm's \r
    echo "error: stage $1 --out $out${error:+: ${error#error*: }} (exit $rc; whole output: $log)" >&2
  fi
  return "$rc"
}

if [ -n "${INIT:-}" ]; then
  # ---- DFT only: an existing small LLaVA distilled from a larger one of the same tokenizer ----
  : "${TEACHER:?set TEACHER}" "${SFT_DATA:?set SFT_DATA}" "${SFT_IMAGES:?set SFT_IMAGES}"
  EXTRA=${EXTRA---group_by_length}
  HELD=${EVAL_DATA:+--eval_data $EVAL_DATA --eval_images ${EVAL_IMAGES:-$SFT_IMAGES} --eval_every ${EVAL_EVERY:-200}}
  stage dft --data $SFT_DATA --images $SFT_IMAGES --batch_size ${BATCH:-8} $EXTRA $HELD \
    --init "$INIT" --teacher "$TEACHER" --out "$OUT/student-dft"
  echo "distilled: $OUT/student-dft (LlavaForConditionalGeneration.from_pretrained loads it)"
  exit 0
fi

if [ -n "${STUDENT_LLM:-}${TEACHER_LLM:-}${TEACHER:-}${VISION:-}" ]; then
  # ---- the real recipe (Table A9 defaults: lr, global batch, one epoch, AdamW, cosine, 3% warmup) ----
  : "${VISION:?set VISION}" "${STUDENT_LLM:?set STUDENT_LLM}" "${PT_DATA:?set PT_DATA}" "${PT_IMAGES:?set PT_IMAGES}"
  : "${SFT_DATA:?set SFT_DATA}" "${SFT_IMAGES:?set SFT_IMAGES}"
  EXTRA=${EXTRA---group_by_length}; B="--batch_size ${BATCH:-8} $EXTRA"
  PT_HELD=${PT_EVAL_DATA:+--eval_data $PT_EVAL_DATA --eval_images ${PT_EVAL_IMAGES:-$PT_IMAGES} --eval_every ${EVAL_EVERY:-200}}
  HELD=${EVAL_DATA:+--eval_data $EVAL_DATA --eval_images ${EVAL_IMAGES:-$SFT_IMAGES} --eval_every ${EVAL_EVERY:-200}}
  PT="--data $PT_DATA --images $PT_IMAGES $B $PT_HELD"; SFT="--data $SFT_DATA --images $SFT_IMAGES $B $HELD"
  if [ -z "${TEACHER:-}" ]; then  # the teacher: PT -> SFT, as LLaVA-1.5 / TinyLLaVA train it
    : "${TEACHER_LLM:?set TEACHER_LLM or TEACHER}"
    stage pt  $PT  --vision "$VISION" --llm "$TEACHER_LLM" --out "$OUT/teacher-pt"
    stage sft $SFT --init "$OUT/teacher-pt" --out "$OUT/teacher"
    TEACHER=$OUT/teacher
  fi
  stage dpt $PT  --vision "$VISION" --llm "$STUDENT_LLM" --teacher "$TEACHER" --out "$OUT/student-dpt"
  stage sft $SFT --init "$OUT/student-dpt" --out "$OUT/student-dpt-sft"
  stage dft $SFT --init "$OUT/student-dpt-sft" --teacher "$TEACHER" --out "$OUT/student-llava-kd"
  $PYTHON llava_kd.py plot "$OUT/student-dpt" "$OUT/student-dpt-sft" "$OUT/student-llava-kd" --out "$OUT/curves.png"
  echo "LLaVA-KD student: $OUT/student-llava-kd (LlavaForConditionalGeneration.from_pretrained loads it)"
  exit 0
fi

# ---- the toy recipe: tiny models and a synthetic image-QA set written here, offline, on a CPU ----
EXTRA=${EXTRA:-}; SEEDS=${SEEDS:-0 1 2}; T=$OUT/setup
TOY_PT_EPOCHS=${TOY_PT_EPOCHS:-2}; TOY_SFT_EPOCHS=${TOY_SFT_EPOCHS:-28}; TOY_TEACHER_EPOCHS=${TOY_TEACHER_EPOCHS:-2}
TOY_SFT_LR=${TOY_SFT_LR:-3e-3}; TOY_TEACHER_LR=${TOY_TEACHER_LR:-1e-3}
TOY_STEPS=${TOY_STEPS:-}; STEP=${TOY_STEPS:+--max_steps $TOY_STEPS}  # TOY_STEPS, TOY_QUICK: the tests
COMMON="--images $T/data/images --max_length 192 --workers 0 $STEP $EXTRA"
PT="--data $T/data/pretrain.json --lr 1e-3 --epochs $TOY_PT_EPOCHS --batch_size 16 --global_batch_size 32 $COMMON"
SFT="--data $T/data/sft.json --lr $TOY_SFT_LR --epochs $TOY_SFT_EPOCHS --batch_size 8 --global_batch_size 8 $COMMON"
PT="$PT --eval_data $T/data/heldout_pretrain.json --eval_every 20"  # 96 held-out images: true captions,
SFT="$SFT --eval_data $T/data/heldout_sft.json --eval_every 140"    # true facts; ~10 records a stage
EVAL="$PYTHON toy.py eval --data $T/data/test.json --images $T/data/images"
START=$(date +%s)  # run again, it goes on where it stopped (delete $OUT to start over)
setup() { $PYTHON toy.py setup --out "$T" --seed ${TOY_SEED:-0} ${TOY_QUICK:+--quick}; }  # data, tokenizer, tower, LLMs

teacher() {  # once for every seed: PT -> SFT on 12x the students' rows (teacher_sft.json)
  stage pt  $PT  --vision $T/vision --llm $T/teacher_llm --out $OUT/teacher-pt
  stage sft $SFT --init $OUT/teacher-pt --out $OUT/teacher-pt-sft --data $T/data/teacher_sft.json \
    --epochs $TOY_TEACHER_EPOCHS --lr $TOY_TEACHER_LR
}
baseline() {  # a student's stages without the teacher
  local s=$1 S=$OUT/seed$1
  stage pt  $PT  --seed $s --vision $T/vision --llm $T/student_llm --out $S/pt
  stage sft $SFT --seed $s --init $S/pt --out $S/pt-sft
  stage sft $SFT --seed $s --init $S/pt-sft --out $S/pt-sft-sft
}
distilled() {  # a student's stages with the teacher: DPT -> SFT -> DFT (LLaVA-KD)
  local s=$1 S=$OUT/seed$1 K="--teacher $OUT/teacher-pt-sft"
  stage dpt $PT  --seed $s --vision $T/vision --llm $T/student_llm $K --out $S/dpt
  stage sft $SFT --seed $s --init $S/dpt --out $S/dpt-sft
  stage dft $SFT --seed $s --init $S/dpt-sft $K --out $S/dpt-sft-dft
}
dft_after_sft() {  # DFT on the baseline's PT -> SFT student
  stage dft $SFT --seed $1 --init $OUT/seed$1/pt-sft --teacher $OUT/teacher-pt-sft --out $OUT/seed$1/pt-sft-dft
}
evaluate() {  # the question-only prior and the teacher, or one seed's five students
  if [ "$1" = teacher ]; then
    rm -f $OUT/teacher-results.jsonl  # evaluated again on a rerun
    $EVAL --prior $T/data/sft.json --model $OUT/teacher-pt-sft --row "teacher PT-SFT" --results $OUT/teacher-results.jsonl
  else
    local S=$OUT/seed$1; rm -f $S/results.jsonl
    $EVAL --seed $1 --results $S/results.jsonl --model $S/pt-sft $S/dpt-sft $S/pt-sft-dft $S/dpt-sft-dft $S/pt-sft-sft \
      --row "student PT-SFT" "student DPT-SFT" "student PT-SFT-DFT" "student DPT-SFT-DFT (LLaVA-KD)" \
      "student PT-SFT-SFT (no teacher)"
  fi
}
# Every process trains on one thread (OMP_NUM_THREADS=1, torchrun's default), so independent chains run side by side:
# first the teacher and each seed's stages that need no teacher; once the teacher is there, each seed's distilled
# stages; then every eval. Each chain's output goes to $OUT/logs/; every 20 s a line says where each
# chain is. A chain that fails stops the recipe and shows its error (or its log's end).
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
forward() {  # forward SIG: to every stage (it checkpoints its step and stops) and evaluation started here
  local p
  for p in $(descendants $$); do
    case " $(ps -o args= -p "$p" 2>/dev/null) " in
      *" llava_kd.py train "*|*" toy.py "*) kill -s "$1" "$p" 2>/dev/null || true ;;
    esac
  done
}
signalled=  # a signal to train.sh (kill, scancel --batch, Ctrl-C): passed on, and no chain starts after
for s in TERM INT HUP QUIT USR1; do trap "signalled=$s; forward $s" "$s"; done
progress() {  # every PROGRESS_EVERY s: each running chain's stage, step and loss (its log's last progress line)
  local name line shown; declare -A last
  # its sleep holds no output nor OUT's lock: killed, the monitor leaves it to end alone
  while sleep "${PROGRESS_EVERY:-20}" > /dev/null 2>&1 9>&- && kill -0 $$ 2>/dev/null; do
    shown=
    for name in "$@"; do
      line=$(tail -c 2000 "$OUT/logs/$name.log" 2>/dev/null | tr '\r' '\n' | grep -a "it/s\|s/it" | tail -n 1 |
        sed -nE 's#^([a-z]+): .* ([0-9]+/[0-9]+) .*[ ,]loss=([^,]+),.*#\1 \2 loss \3#p' || true)
      [ "$line" != "${last[$name]:-}" ] && shown="$shown${line:+ | $name: $line}"
      last[$name]=$line
    done
    [ -z "$shown" ] || echo "[$(( $(date +%s) - START )) s]${shown# |}"
  done
}
parallel() {  # parallel "function args" ...: each in the background, its output in $OUT/logs/; waits for all
  local pids=() names=() failed=() i rc monitor
  for job in "$@"; do
    names+=("${job// /}"); (set -e; export OMP_NUM_THREADS=1; $job) > "$OUT/logs/${names[-1]}.log" 2>&1 & pids+=($!)
  done
  progress "${names[@]}" 9>&- & monitor=$!
  for i in "${!pids[@]}"; do
    while :; do  # a signal ends `wait` early (status > 128): wait again until the chain has ended
      wait "${pids[$i]}" && rc=0 || rc=$?
      kill -0 "${pids[$i]}" 2>/dev/null || break
    done
    if [ "$rc" = 0 ]; then
      echo "done: ${names[$i]} at $(( $(date +%s) - START )) s"
    else  # the first to fail: the other chains checkpoint their step and stop too
      [ ${#failed[@]} -gt 0 ] || forward TERM
      failed+=("${names[$i]}")
    fi
  done
  kill "$monitor" 2>/dev/null || true
  for name in "${failed[@]}"; do
    tr '\r' '\n' < "$OUT/logs/$name.log" | grep -a "^error" >&2 || tail -n 20 "$OUT/logs/$name.log" >&2
    echo "error: the toy recipe's $name stages failed; the whole log: $OUT/logs/$name.log" >&2
  done
  [ ${#failed[@]} = 0 ] || exit 1
  if [ -n "$signalled" ]; then
    echo "error: the toy recipe was stopped by SIG$signalled; run the same command to go on" >&2
    exit 1
  fi
}
parallel setup
chains=("teacher"); for s in $SEEDS; do chains+=("baseline $s"); done
parallel "${chains[@]}"
chains=(); for s in $SEEDS; do chains+=("distilled $s" "dft_after_sft $s"); done
parallel "${chains[@]}"
chains=("evaluate teacher"); for s in $SEEDS; do chains+=("evaluate $s"); done
parallel "${chains[@]}"
cat $OUT/teacher-results.jsonl $(for s in $SEEDS; do echo $OUT/seed$s/results.jsonl; done) > $OUT/results.jsonl
S=$OUT/seed${SEEDS%% *}  # the first seed's LLaVA-KD chain, as a picture
$PYTHON llava_kd.py plot $S/dpt $S/dpt-sft $S/dpt-sft-dft --out $OUT/curves.png
$PYTHON toy.py table --results $OUT/results.jsonl --out $OUT/table.md --seconds $(( $(date +%s) - START ))
