#!/bin/bash
# Each method beyond LoRA trained by `lorakit train` on the bundled task exactly as `make demo` trains LoRA
# (60 steps, global batch 8, seed 0, cosine schedule), exact match on the first 100 held-out rows; one run each,
# at the learning rate written below. Collects trainable parameters, exact match, final loss and adapter file
# size into a JSON file (step times are not reported: run benchmarks/bench_methods.py for those).
#
#   bash benchmarks/train_methods.sh benchmarks/results/train_methods.json [runs-folder]
set -euo pipefail
out_json=${1:?usage: train_methods.sh OUT.json [RUNS_FOLDER]}
runs=${2:-runs/methods}
py=${PYTHON:-.venv/bin/python}
methods=("prompt-tuning 3e-2" "p-tuning 1e-2" "prefix-tuning 1e-2" "houlsby 1e-3" "pfeiffer 1e-3")
for spec in "${methods[@]}"; do
  read -r method lr <<<"$spec"
  echo "=== $method (lr $lr)"
  "$py" -m lorakit train --method "$method" --lr "$lr" --max-steps 60 --eval-limit 100 --no-eval-before \
    --save-every 0 --samples 0 --no-progress --overwrite --output "$runs/$method"
done
"$py" - "$out_json" "$runs" "${methods[@]}" <<'PY'
import json, os, sys
out, runs, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = {}
for spec in specs:
    method, lr = spec.split()
    m = json.load(open(os.path.join(runs, method, "metrics.json")))
    after = m["eval_after"]
    rows[method] = {
        "learning_rate": float(lr),
        "steps": m["total_steps"],
        "global_batch": m["global_batch"],
        "trainable_parameters": m["trainable_parameters"],
        "exact_match": after["accuracy"],
        "final_loss_mean_last_10pct": m["final_loss_mean_last_10pct"],
        "adapter_file_bytes": os.path.getsize(os.path.join(runs, method, "adapter_model.safetensors")),
    }
json.dump(rows, open(out, "w"), indent=2)
for method, r in rows.items():
    print(f"{method:<14} lr {r['learning_rate']:<6g} trainable {r['trainable_parameters']:>10,}  exact match "
          f"{r['exact_match']:.0%}  final loss {r['final_loss_mean_last_10pct']:.4f}  file {r['adapter_file_bytes']:,} B")
PY
