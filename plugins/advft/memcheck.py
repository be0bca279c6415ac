"""Peak memory (RSS) of advft's fine-tuning at SD v1.4 size on the CPU (issue 25, defect 9).

Builds the ``sd-random`` model's SD v1.4 pipeline (``memobench_plugins.sd_random.build_pipeline``: SD v1.4's
full-size architecture, seeded random weights, no download), then runs :meth:`AdversarialFineTuning.fit` with minimal work: one epoch, one target, one DoRI run of one
step (batch 1) and ``--steps`` fine-tuning steps on one adversarial pair plus ``--regular-batch`` regular pairs, at
``--size`` px. The surrogate images and the regular caption–image pairs are replaced by random latents of the run's
size (they only feed the loss; NeMo, the SSCD model and image decoding are not part of the fine-tuning's memory).
Prints one JSON line: the process's peak RSS (``ru_maxrss``), the RSS after building the model, the seconds taken.

``--code FILE`` loads the plugin from another file, e.g. an earlier version for a before/after comparison::

    git show 12fd6c3:plugins/advft/__init__.py > /tmp/advft_v4.py
    OMP_NUM_THREADS=2 python -m memobench_plugins.advft.memcheck --code /tmp/advft_v4.py --dtype bf16

The run needs several GB (see the advft docstring); ``--min-available-gib`` refuses to start when the machine has
less memory available than that (``MemAvailable``), so that a shared machine is not pushed into swapping or the OOM
killer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("inf")


def _plugin_class(code: str | None):
    if not code:
        from memobench_plugins.advft import AdversarialFineTuning

        return AdversarialFineTuning
    spec = importlib.util.spec_from_file_location("advft_under_test", code)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through the module
    spec.loader.exec_module(mod)
    return mod.AdversarialFineTuning


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", default="", help="plugin file to measure (default: the installed advft)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--size", type=int, default=256, help="generation size in px (latents size/8)")
    ap.add_argument("--steps", type=int, default=1, help="fine-tuning steps")
    ap.add_argument("--regular-batch", type=int, default=1)
    ap.add_argument("--param", action="append", default=[], help="KEY=VALUE advft parameter (e.g. train_params=xattn)")
    ap.add_argument("--min-available-gib", type=float, default=0.0)
    a = ap.parse_args(argv)
    if _available_gib() < a.min_available_gib:
        sys.exit(f"error: {_available_gib():.1f} GiB available < --min-available-gib {a.min_available_gib}; "
                 "run it where more memory is free")

    import numpy as np
    import torch

    from memobench.api import Context, DiffusionModel, Prompt, get_registry
    from memobench_plugins.sd_random import build_pipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    t0 = time.time()
    model = DiffusionModel(build_pipeline("sd14", "full", seed=0), "sd14-random", dtype=dtype)
    rss_model = _rss_gib()
    t_build = time.time() - t0
    cls = _plugin_class(a.code)
    params = dict(epochs=1, dori_steps=1, dori_batch=1, inits="prompt", steps_per_epoch=a.steps,
                  regular_batch=a.regular_batch, n_regular=max(1, a.regular_batch), surrogate="none",
                  surrogate_params="", surrogate_tries=1)
    for kv in a.param:
        k, _, v = kv.partition("=")
        params[k] = v
    m = cls(cls.make_params(params))
    h = w = a.size // model.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    reg_z = torch.randn((max(1, a.regular_batch), 4, h, w), generator=gen)
    sur_z = torch.randn((1, 4, h, w), generator=gen)
    target = Prompt("t0", "a photo of a cat sitting on a red mat", mem_type="VM", reference_ids=("r",))
    image = np.random.default_rng(0).integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    m._regular_pairs = lambda model, ctx: ("random latents", ["a photo of a dog"] * len(reg_z), reg_z)
    m._surrogates = lambda model, prompts, ctx: ({q.id: sur_z for q in prompts}, {"surrogate": "random latent"})
    with tempfile.TemporaryDirectory() as cache:
        ctx = Context(cache_dir=Path(cache), registry=get_registry(), references=lambda p: [image],
                      generation={"num_inference_steps": 2, "guidance_scale": 7.5, "height": a.size, "width": a.size})
        t1 = time.time()
        m.fit(model, [target], ctx)
        t_fit = time.time() - t1
    out = {"code": a.code or "memobench_plugins.advft", "dtype": a.dtype, "size": a.size, "steps": a.steps,
           "regular_batch": a.regular_batch, "params": {k: str(v) for k, v in params.items()},
           "n_unet_parameters": sum(q.numel() for q in model.unet.parameters()),
           "rss_after_model_gib": round(rss_model, 3),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
           "build_s": round(t_build, 1), "fit_s": round(t_fit, 1), "torch_threads": torch.get_num_threads()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
