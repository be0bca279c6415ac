"""Recipe sweep for the embedded model on one GPU (session 8; README.md beside this file).

    SWEEP_CANDS='{"v2500": {"prediction_type": "v_prediction"}}' OUT=DIR [SWEEP_BASE=DIR] python sweep.py

Runs the shared phases once (pools, VAE, latents, decoder refinement: the ``BASE`` recipe entries), copies them into
one work folder per candidate, trains every candidate's UNet phase in parallel with ``memobench zoo train tiny
--device cuda`` (candidate = ``BASE`` + its overrides), runs ``benchmarks/tiny_model_checks.py`` on each export, and
packs the checks, logs and grids into ``OUT/sweep.tar.gz`` plus the best candidates' fp16 UNets.
``SWEEP_BASE``: a folder with finished ``vae_*``/``dec_*`` weights and state files (their optimizer files are then
written fresh: those phases are complete and never step again). ``SWEEP_DEADLINE`` (seconds) kills what is still
running and packs what finished. ``SWEEP_SMOKE=1 SWEEP_DEVICE=cpu`` runs it in a few minutes on a CPU.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT", "/tmp/out")); OUT.mkdir(parents=True, exist_ok=True)
W = Path(os.environ.get("SWEEP_W", "/tmp/w")); W.mkdir(parents=True, exist_ok=True)
DEV = os.environ.get("SWEEP_DEVICE", "cuda")
SMOKE = os.environ.get("SWEEP_SMOKE") == "1"
from memobench_plugins.tiny import data as D
from memobench_plugins.tiny import train as T

BASE = {"photo_pool": 2000, "frac_photo": 0.125, "dec_steps": 3000, "dec_noise": 1.0, "dec_lr": 5e-4}
CANDS = json.loads(os.environ["SWEEP_CANDS"])
if SMOKE:
    BASE.update({"vae_steps": 2, "dec_steps": 2, "general_pool": 64, "photo_pool": 16, "checkpoint_every": 1})
    CANDS = {k: {**v, "unet_steps": 2} for k, v in CANDS.items()}
LOG = OUT / "sweep.log"


def log(m):
    m = f"[{time.strftime('%H:%M:%S')}] {m}"
    print(m, flush=True)
    with open(LOG, "a") as f:
        f.write(m + "\n")


t0 = time.time()
r = {**T.RECIPE, **BASE}
b = W / "base"; b.mkdir(exist_ok=True)
if os.environ.get("SWEEP_BASE"):  # a finished VAE + decoder phase (weights and state only; fresh optimizer files)
    import torch
    for f in Path(os.environ["SWEEP_BASE"]).iterdir():
        shutil.copy(f, b / f.name)
    vae = T.build_components(r)["vae"]
    if not (b / "vae_opt.safetensors").exists():
        T._save_opt(torch.optim.Adam(vae.parameters()), b / "vae_opt.safetensors")
    if not (b / "dec_opt.safetensors").exists():
        T._save_opt(torch.optim.Adam(list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())),
                    b / "dec_opt.safetensors")
if not (b / "general_pool.npy").exists():
    pool, caps = D.general_pool(r["general_pool"], seed=r["seed"], res=r["res"])
    (b / "general_pool.npy").write_bytes(T._npy_bytes(pool)); (b / "general_pool.json").write_text(json.dumps(caps))
def _photo():
    p, c = D.photo_pool(r["photo_pool"], seed=r["seed"], res=r["res"])
    (b / "photo_pool.json").write_text(json.dumps(c)); (b / "photo_pool.npy").write_bytes(T._npy_bytes(p))


import multiprocessing as mp

pp = None
if not (b / "photo_pool.npy").exists():
    pp = mp.get_context("fork").Process(target=_photo); pp.start()
T.train_vae(b, r, False, log, DEV); log(f"vae {time.time() - t0:.0f}s")
T.encode_latents(b, r, DEV)
if pp is not None:
    pp.join(); assert pp.exitcode == 0
log(f"pools {time.time() - t0:.0f}s")
T.encode_photo_latents(b, r, DEV)
T.refine_decoder(b, r, False, log, DEV); log(f"dec {time.time() - t0:.0f}s")
from memobench_plugins.tiny.tokenizer import load_sd_tokenizer

load_sd_tokenizer(b / "tokenizer")

procs = {}
for name, ov in CANDS.items():
    d = W / name
    if not d.exists():
        shutil.copytree(b, d)
    args = [sys.executable, "-m", "memobench.cli", "zoo", "train", "tiny", "--work-dir", str(d), "--device", DEV]
    for k, v in {**BASE, **ov}.items():
        args += ["--recipe-param", f"{k}={json.dumps(v)}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    procs[name] = (subprocess.Popen(args, stdout=open(W / f"{name}.train.log", "w"), stderr=subprocess.STDOUT, env=env),
                   time.time())
log("launched " + ", ".join(procs))

checks = {}
DEADLINE = t0 + float(os.environ.get("SWEEP_DEADLINE", "1e9"))
while procs or any(p.poll() is None for p, _ in checks.values()):
    if time.time() > DEADLINE:
        for name, (p, _) in list(procs.items()) + list(checks.items()):
            if p.poll() is None:
                p.kill(); log(f"{name}: killed at the deadline")
        procs = {}
        break
    for name, (p, ts) in list(procs.items()):
        if p.poll() is None:
            continue
        del procs[name]
        log(f"{name}: train rc {p.returncode} {time.time() - ts:.0f}s")
        if p.returncode:
            continue
        ca = [sys.executable, "benchmarks/tiny_model_checks.py", "--model-param", f"path={W / name / 'pipeline'}",
              "--device", DEV, "--out", str(W / f"checks_{name}"), "--results-dir", str(W / f"res_{name}"),
              "--cache-dir", str(W / f"cache_{name}")] + (["--steps", "2"] if SMOKE else [])
        checks[name] = (subprocess.Popen(ca, stdout=open(W / f"{name}.checks.log", "w"), stderr=subprocess.STDOUT,
                                         env={**os.environ, "OMP_NUM_THREADS": "2"}), time.time())
    time.sleep(2)
for name, (p, ts) in checks.items():
    p.wait()
    log(f"{name}: checks rc {p.returncode} {time.time() - ts:.0f}s")
log(f"all done {time.time() - t0:.0f}s")

# summary + artefacts
summ = {}
for name in CANDS:
    j = W / f"checks_{name}.json"
    if j.exists():
        summ[name] = json.loads(j.read_text())
(OUT / "summary.json").write_text(json.dumps(summ, indent=1))
with tarfile.open(OUT / "sweep.tar.gz", "w:gz") as tf:
    for f in sorted(W.glob("*.log")) + sorted(W.glob("checks_*")):
        tf.add(f, arcname=f.name)
    for name in CANDS:
        for g in (W / f"res_{name}").rglob("*.grid.png"):
            tf.add(g, arcname=f"grids/{name}__{g.parent.name}__{g.name}")
        for f in ("recipe.json",):
            if (W / name / f).exists():
                tf.add(W / name / f, arcname=f"{name}/{f}")
# fp16 UNets of the best candidates (text encoder is frozen and seeded: identical in all; VAE is shared)
from safetensors.torch import load_file, save_file

rank = sorted(summ, key=lambda n: (-summ[n]["vm"]["mr"], -summ[n]["vm"]["sscd_orig"]))
keep = [n for n in os.environ.get("SWEEP_KEEP", "").split(",") if n in summ] or rank[:int(os.environ.get("SWEEP_NKEEP", "3"))]
log(f"rank {rank}; keep {keep}")
for n in keep:
    sd = load_file(str(W / n / "unet_ema_unet.safetensors"))
    save_file({k: v.half() for k, v in sd.items()}, str(OUT / f"unet16_{n}.safetensors"))
if keep:
    sd = load_file(str(b / "dec_vae.safetensors")) if (b / "dec_vae.safetensors").exists() else {}
    save_file({k: v.half() for k, v in sd.items()}, str(OUT / "dec_vae16.safetensors"))
log("packed")
