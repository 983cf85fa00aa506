#!/usr/bin/env bash
# Runs the third-party tool heretic (PyPI heretic-llm 1.4.0, github.com/p-e-w/heretic) on the
# float32 Qwen2.5-Coder-0.5B-Instruct folder, on the CPU, offline, as a baseline for cosmic-bake.
# heretic is AGPL-3.0: it is only run here as a separate program from its own venv, never imported.
#
#   TRIALS=20 benchmarks/heretic_run.sh OUT_DIR
#
# Optional env: STARTUP_TRIALS (default 30% of TRIALS), N_PROMPTS (cap every prompt set),
# MAX_RESPONSE_LENGTH (100), BATCH_SIZE (32), SEED (42), KL_MAX (0.5), MODEL, VENV, PROMPTS, DATA.
# Writes OUT/config.toml, OUT/heretic.log (+ heretic_timed.log), OUT/heretic_time.txt, OUT/heretic_trials.tsv,
# OUT/heretic_choice.txt and the chosen trial's merged model in OUT/model.
# The trial saved: the Pareto-front trial with the fewest refusals whose KL <= KL_MAX
# (else the front's lowest-KL trial). Menus are answered on stdin (COLAB_GPU=1 makes them input()).
set -euo pipefail

OUT=${1:?usage: TRIALS=20 $0 OUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-/work/heretic-venv}
MODEL=${MODEL:-$HOME/.cache/cosmic-bake/dequantized/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M-491400064-1796225520-float32}
PROMPTS=${PROMPTS:-/work/heretic-run/prompts}
DATA=${DATA:-$HERE/../../shared/data}
TRIALS=${TRIALS:-20}
STARTUP_TRIALS=${STARTUP_TRIALS:-$(( TRIALS * 3 / 10 > 0 ? TRIALS * 3 / 10 : 1 ))}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-100}
BATCH_SIZE=${BATCH_SIZE:-32}
SEED=${SEED:-42}
KL_MAX=${KL_MAX:-0.5}
N_PROMPTS=${N_PROMPTS:-}

[ -x "$VENV/bin/heretic" ] || { echo "no heretic in $VENV" >&2; exit 1; }
[ -f "$MODEL/config.json" ] || { echo "no model folder at $MODEL" >&2; exit 1; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Prompt sets as local JSONL datasets (column "instruction"); JSONL keeps multi-line prompts whole.
# heretic never sees harmful_val.json or harmless_val[:100].
if [ ! -f "$PROMPTS/good_eval/train.jsonl" ]; then
  "$VENV/bin/python" - "$DATA" "$PROMPTS" <<'EOF'
import json, os, sys
data, out = sys.argv[1], sys.argv[2]
load = lambda name: json.load(open(os.path.join(data, name + ".json"), encoding="utf-8"))
sets = {
    "bad_train": load("harmful_train")[:200],
    "good_train": load("harmless_train")[:200],
    "bad_eval": load("harmful_train")[200:260],
    "good_eval": load("harmless_val")[100:200],
}
for name, rows in sets.items():
    assert len(rows) == {"bad_eval": 60, "good_eval": 100}.get(name, 200), name
    os.makedirs(os.path.join(out, name), exist_ok=True)
    with open(os.path.join(out, name, "train.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"instruction": row["instruction"]}, ensure_ascii=False) + "\n")
EOF
fi

SPLIT="train${N_PROMPTS:+[:$N_PROMPTS]}"
cat > "$OUT/config.toml" <<EOF
# Written by benchmarks/heretic_run.sh; heretic reads config.toml from its working directory.
model = "$MODEL"
dtypes = ["float32"]
device_map = "cpu"
batch_size = $BATCH_SIZE
max_response_length = $MAX_RESPONSE_LENGTH
n_trials = $TRIALS
n_startup_trials = $STARTUP_TRIALS
seed = $SEED
study_checkpoint_dir = "$OUT/checkpoints"
export_strategy = "merge"

[good_prompts]
dataset = "$PROMPTS/good_train"
split = "$SPLIT"
column = "instruction"

[bad_prompts]
dataset = "$PROMPTS/bad_train"
split = "$SPLIT"
column = "instruction"

[good_evaluation_prompts]
dataset = "$PROMPTS/good_eval"
split = "$SPLIT"
column = "instruction"

[bad_evaluation_prompts]
dataset = "$PROMPTS/bad_eval"
split = "$SPLIT"
column = "instruction"
EOF

# A fresh study each time (an old checkpoint would add a continue/restart menu).
rm -rf "$OUT/checkpoints" "$OUT/model"

# Drives heretic's numbered input() menus: pick a trial, save it merged to OUT/model, exit.
cat > "$OUT/heretic_driver.py" <<'EOF'
import os, re, select, subprocess, sys, time
out, kl_max, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
t0 = time.time()
proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
buf, since, lines, state = b"", "", [], {"saved": False}
trials, cur = [], None
timed = open(os.path.join(out, "heretic_timed.log"), "w")  # each line with seconds since start

def choose(text):
    for q in ("Which trial do you want to use?", "What do you want to do with the decensored model?",
              "How would you like to proceed?"):
        if q in text:
            text = text[text.rfind(q):]
            break
    opts = re.findall(r"^\[(\d+)\] (.*)$", text, re.M)
    titles = {t.strip(): n for n, t in opts}
    if "Which trial do you want to use?" in text:
        if state["saved"]:
            return titles["Exit program"], "exit"
        front = []
        for n, t in opts:
            m = re.match(r"\[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([\d.]+)", t)
            if m:
                front.append((int(m[2]), float(m[4]), int(m[1]), n))
        if not front:
            raise SystemExit("no trials found in the menu:\n" + text)
        ok = [f for f in front if f[1] <= kl_max]
        pick = min(ok) if ok else min(front, key=lambda f: f[1])
        with open(os.path.join(out, "heretic_choice.txt"), "w") as f:
            f.write("pareto front (trial refusals kl):\n")
            f.writelines(f"  {t} {r} {k}\n" for r, k, t, _n in front)
            f.write(f"rule: fewest refusals with kl <= {kl_max}, else lowest kl\nchosen trial: {pick[2]} refusals={pick[0]} kl={pick[1]}\n")
        return pick[3], f"trial {pick[2]}"
    if "What do you want to do with the decensored model?" in text:
        want = "Return to the trial selection menu" if state["saved"] else "Save the model to a local folder"
        return titles[want], want
    if "How would you like to proceed?" in text:
        return titles["Ignore the previous run and start from scratch"], "restart"
    raise SystemExit("unexpected menu:\n" + text)

while True:
    # An unknown question (output ending in ": " and then silence) stops the run instead of hanging.
    if not select.select([proc.stdout], [], [], 300)[0]:
        if buf.rstrip(b" ").endswith((b":", b"?")):
            proc.kill()
            raise SystemExit("heretic_run.sh: unanswered question: " + buf.decode("utf-8", "replace")[-200:])
        continue
    chunk = os.read(proc.stdout.fileno(), 65536)
    if not chunk:
        break
    sys.stdout.buffer.write(chunk); sys.stdout.flush()
    buf += chunk
    *done, rest = buf.split(b"\n")
    for raw in done:
        line = raw.decode("utf-8", "replace")
        now = time.time() - t0
        timed.write(f"{now:8.1f}  {line}\n"); timed.flush()
        m = re.search(r"Running trial (\d+) of", line)
        if m:
            cur = {"trial": int(m[1]), "start": now}
            trials.append(cur)
        elif cur and "KL divergence:" in line and line.lstrip().startswith("*"):
            cur["kl"] = line.split(":")[-1].strip()
        elif cur and "Refusals:" in line and line.lstrip().startswith("*"):
            cur["refusals"] = line.split(":")[-1].strip()
        elif cur and line.startswith("Elapsed time:"):
            cur["end"] = now
        if "Model saved to" in line:
            state["saved"] = True
        since += line + "\n"
    buf = rest
    tail = rest.decode("utf-8", "replace")
    if tail.endswith("Enter number: "):
        answer, what = choose(since)
    elif re.search(r"Path to the folder:+ $", tail):  # 1.4.0 prints "Path to the folder:: "
        answer, what = os.path.join(out, "model"), "save"
    else:
        continue
    print(f"{answer}    [heretic_run.sh: {what}]", flush=True)
    proc.stdin.write(f"{answer}\n".encode()); proc.stdin.flush()
    since, buf = "", b""
rc = proc.wait()
with open(os.path.join(out, "heretic_trials.tsv"), "w") as f:
    f.write("trial\tstart_s\tduration_s\tkl\trefusals\n")
    for t in trials:
        d = f"{t['end'] - t['start']:.1f}" if "end" in t else ""
        f.write(f"{t['trial']}\t{t['start']:.1f}\t{d}\t{t.get('kl', '')}\t{t.get('refusals', '')}\n")
sys.exit(rc if state["saved"] or rc else 3)
EOF

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 COLAB_GPU=1 COLUMNS=200 PYTHONUNBUFFERED=1
cd "$OUT"
start=$(date +%s.%N)
set +e
/usr/bin/time -v -o "$OUT/heretic_time.txt" \
  "$VENV/bin/python" "$OUT/heretic_driver.py" "$OUT" "$KL_MAX" "$VENV/bin/heretic" 2>&1 | tee "$OUT/heretic.log"
rc=${PIPESTATUS[0]}
set -e
end=$(date +%s.%N)
printf 'wall_s=%.1f trials=%s startup_trials=%s n_prompts=%s max_response_length=%s batch_size=%s rc=%s\n' \
  "$(echo "$end - $start" | bc)" "$TRIALS" "$STARTUP_TRIALS" "${N_PROMPTS:-all}" "$MAX_RESPONSE_LENGTH" \
  "$BATCH_SIZE" "$rc" >> "$OUT/heretic_time.txt"
exit "$rc"
