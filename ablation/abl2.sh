#!/bin/bash
# abl2.sh NAME FACTOR [flags...]: a row on top of the current best (best.json): its flags plus these, for
# round(1100 x best factor x FACTOR) iterations (FACTOR: this change's paired images/s ratio); afterwards the row
# becomes the best if its FID-1k is more than 1 point lower. DECIDE_ONLY=1: only the comparison (the row already ran).
name=$1; factor=$2; shift 2
cd /work/runs
bflags=$(python3 -c "import json; print(json.load(open('best.json'))['flags'])")
bfactor=$(python3 -c "import json; print(json.load(open('best.json'))['factor'])")
iters=$(python3 -c "print(round(1100 * $bfactor * $factor))")
if [ -z "$DECIDE_ONLY" ]; then echo "row $name: $bflags $* for $iters iterations"; ./abl.sh $name $iters $bflags "$@"; fi
python3 - "$name" "$factor" "$*" <<'PY'
import json, re, sys
name, factor, flags = sys.argv[1], float(sys.argv[2]), sys.argv[3]
best = json.load(open("best.json"))
fid = float(re.search(r"FID ([0-9.]+)", open(f"abl_{name}.fid").read()).group(1))
with open("rows.log", "a") as f:
    f.write(f"{name}\t{fid:.3f}\tagainst {best['name']} {best['fid']:.3f}\tflags: {best['flags']} {flags}\n")
if fid < best["fid"] - 1.0:
    json.dump(dict(name=name, flags=f"{best['flags']} {flags}".strip(), factor=best["factor"] * factor, fid=fid), open("best.json", "w"))
    print(f"{name} is the new best: {fid:.3f}")
PY
