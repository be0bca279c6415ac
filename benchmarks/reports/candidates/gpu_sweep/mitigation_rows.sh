#!/bin/bash
# Mitigation x DoRI rows of issue 6 on a candidate pipeline folder, five `memobench run`s in parallel on one GPU.
#   M=PIPELINE_DIR OUT=DIR bash mitigation_rows.sh    (session 8: M = assemble.py's fp16 install of the v2500 run)
M=${M:?set M to the pipeline folder}; R=/tmp/res; mkdir -p $R
run() { n=$1; shift; (timeout ${MIT_T:-470} python3 -m memobench.cli run --model-param path=$M --device cuda --metric mr --metric sscd_orig -o $R/$n --cache-dir /tmp/cache_$n --no-progress --json "$@" > $R/$n.json 2> $R/$n.err; echo "$n rc $?") & }
run none_dori -m none -a dori
run none_gauss -m none -a dori --attack-param init=gaussian
run nemo_dori -m nemo -a dori
run wanda_dori -m wanda -a dori
run advft_dori -m advft -a dori
wait
python3 - <<'P'
import json, glob, os
for f in sorted(glob.glob("/tmp/res/*.json")):
    try:
        d = json.loads(open(f).read())
    except Exception as e:
        print(os.path.basename(f), "no result", e); continue
    m, w = d.get("metrics", {}), d.get("metrics_without_attack", {})
    g = lambda x, k: (x.get(k) or {}).get("value")
    print(os.path.basename(f), "with-attack MR", g(m, "mr"), "sscd", g(m, "sscd_orig"), "| without MR", g(w, "mr"), "sscd", g(w, "sscd_orig"))
P
tar czf $OUT/mit.tar.gz -C /tmp res
