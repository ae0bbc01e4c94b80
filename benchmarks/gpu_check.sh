#!/usr/bin/env bash
# One GPU check of llmswarm, printed as ONE JSON document on stdout (progress and errors on stderr).
#
#   benchmarks/gpu_check.sh            on a CUDA machine (after ./install.sh, which adds bitsandbytes
#                                      there): bfloat16 on cuda:0, under 5 minutes for smollm2-135m
#   benchmarks/gpu_check.sh --cpu      the same steps on CPU, float32, smaller: exercises this script
#                                      and every command it calls on a machine without a GPU
#
# Steps (each bounded by `timeout`; a failed step is recorded as {"error": ...} and the rest still run):
#   local       chat --local tokens/s (the in-process reference)
#   swarm       bench swarm: 3 servers sharing the one device vs local, same run
#   server      bench server: one server holding every block, 1 and 16 concurrent sessions
#   quant       bench quant: memory per block, tokens/s and greedy agreement per mode (none, int8, nf4)
#   targets     the issue's targets checked against the figures (null where a figure is missing)
# CUDA graphs are not implemented yet: there is no on/off step.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda:0 dtype=bfloat16 modes=none,int8,nf4 rounds=3 tokens=64 step_s=120
if [ "${1:-}" = "--cpu" ]; then
  device=cpu dtype=float32 modes=none,int8 rounds=1 tokens=16 step_s=400
elif [ -n "${1:-}" ]; then
  echo "gpu_check.sh: unknown option $1 (use --cpu or nothing)" >&2; exit 2
fi
bin=.venv/bin/llmswarm
[ -x "$bin" ] || { echo "gpu_check.sh: run ./install.sh first (no $bin)" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() {  # run NAME CMD...: stdout JSON to $out/NAME.json, stderr tail to $out/NAME.err
  local name=$1; shift
  echo "gpu_check: $name: $*" >&2
  local t0=$SECONDS
  timeout "$step_s" "$@" >"$out/$name.json" 2>"$out/$name.err"
  echo "$?" >"$out/$name.rc"
  echo "gpu_check: $name done in $((SECONDS - t0)) s (rc $(cat "$out/$name.rc"))" >&2
}

run local  "$bin" chat --local --device "$device" --dtype "$dtype" --prompt "Write a short story about a lighthouse keeper." \
           --max-new-tokens "$tokens" --json
run swarm  "$bin" bench swarm --device "$device" --dtype "$dtype" --servers 3 --rounds "$rounds" --tokens "$tokens" --json
run server "$bin" bench server --device "$device" --dtype "$dtype" --sessions 1,16 --tokens 32 --json
run quant  "$bin" bench quant --device "$device" --dtype "$dtype" --modes "$modes" --tokens 32 --rounds "$rounds" --json

.venv/bin/python - "$out" "$device" "$dtype" <<'PY'
import json, pathlib, platform, sys

out, device, dtype = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
doc = {"device": device, "dtype": dtype, "host": platform.node()}
try:
    import torch
    doc["torch"] = torch.__version__
    doc["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as e:  # noqa: BLE001
    doc["torch"] = f"unavailable: {e}"
for name in ("local", "swarm", "server", "quant"):
    rc = int((out / f"{name}.rc").read_text().strip() or 1)
    text = (out / f"{name}.json").read_text().strip()
    try:
        doc[name] = json.loads(text) if rc == 0 else None
    except (json.JSONDecodeError, IndexError):
        doc[name] = None
    if doc[name] is None:
        err = (out / f"{name}.err").read_text().strip().splitlines()
        doc[name] = {"error": f"rc {rc}" + (" (timed out)" if rc == 124 else ""), "stderr_tail": err[-5:]}
local, swarm, server, quant = doc["local"], doc["swarm"], doc["server"], doc["quant"]
doc["summary"] = s = {}
if "tokens_per_s" in local:
    s["local_tokens_per_s"] = local["tokens_per_s"]
if "ratio" in swarm:
    s["swarm_vs_local"] = swarm["ratio"]
    s["swarm_token_identical"] = swarm["token_identical"]
runs = {r["sessions"]: r for r in server.get("runs", [])}
if 1 in runs and 16 in runs:
    s["server_16_vs_1"] = runs[16]["aggregate_tokens_per_s"] / runs[1]["aggregate_tokens_per_s"]
modes = {m["quant"]: m for m in quant.get("modes", [])}
for mode, m in modes.items():
    s[f"{mode}_mib_per_block"] = round(m.get("cuda_bytes_per_block", m["bytes_per_block"]) / 2**20, 3)
    s[f"{mode}_agreement"] = m["agreement"]
    s[f"{mode}_tokens_per_s"] = m["tokens_per_s"]
def target(ok):
    return None if ok is None else bool(ok)
int8, ref = modes.get("int8"), modes.get("none")
def mem(m):
    return m.get("cuda_bytes_per_block", m["bytes_per_block"])
doc["targets"] = {
    "swarm_ge_0.8_of_local": target(s.get("swarm_vs_local") and s["swarm_vs_local"] >= 0.8),
    "server_16_ge_8x_1": target(s.get("server_16_vs_1") and s["server_16_vs_1"] >= 8),
    "int8_mem_le_0.55x_reference": target(int8 and ref and mem(int8) <= 0.55 * mem(ref)),
    "int8_agreement_ge_0.95": target(int8 and int8["agreement"] >= 0.95),
    "note": "reference = the dtype above (bfloat16 on GPU, float32 with --cpu: int8 vs float32 is ~0.25x)",
}
if isinstance(swarm, dict):
    swarm.pop("rounds_detail", None)  # per-round figures: the medians above are what count
print(json.dumps(doc, indent=1))
PY
