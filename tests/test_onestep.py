"""Webster's one-step extraction (``onestep``): the white-box score recomputed here from raw UNet calls with
k-diffusion's denoiser formulas (v-prediction on the embedded model, ε-prediction on the SD v1.4 layout), the
black-box edge map with a Sobel filter written here in numpy, the seed ranking, parameter checks, ``memobench ls``
and end-to-end runs on the embedded model whose picks are recomputed here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memobench.api import BadInput, Context, Prompt
from memobench.config import RunConfig
from memobench.runner import Runner
from memobench_plugins.onestep import OneStep, edge_map, edge_scores, seed_base

W = 3.0


@pytest.fixture(scope="module")
def tiny():
    from memobench.registry import get_registry

    torch.set_num_threads(1)
    return get_registry().get("model", "tiny")().load(Context(cache_dir=Path(".")))


@pytest.fixture(scope="module")
def sd14(tmp_path_factory):
    """SD v1.4's layout (ε-prediction), reduced width."""
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")


def _ctx(size, bs=3):
    return Context(cache_dir=Path("."), generation={"guidance_scale": W, "height": size, "width": size},
                   batch_size=bs)


def _denoised_by_hand(m, seeds, text, size, w=W):
    """k-diffusion's 1-step Heun on Karras sigmas [σ_max, 0]: the CFG-combined denoiser output at σ_max, from
    raw UNet calls (one per half and seed), and z_T = σ_max·n."""
    ab = m.scheduler.alphas_cumprod.double()
    sigmas = ((1 - ab) / ab).sqrt()  # CompVisDenoiser's sigma table; the Karras list for n = 1 is [max, 0]
    s = float(sigmas.max())
    assert s == pytest.approx(float(sigmas[-1]))
    c_in = 1 / (s * s + 1) ** 0.5
    e_c, e_u = m.encode_prompt(text), m.encode_prompt("")
    zs, ds = [], []
    for seed in seeds:
        n = torch.randn((1, *m.latent_shape(size, size)), generator=torch.Generator().manual_seed(seed))
        x = s * n
        outs = []
        for e in (e_u, e_c):
            raw = m.unet(x * c_in, 999, encoder_hidden_states=e).sample
            if m.prediction_type == "epsilon":  # CompVisDenoiser: c_skip = 1, c_out = −σ
                outs.append(x - s * raw)
            else:  # CompVisVDenoiser: c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1)
                outs.append(x / (s * s + 1) - s / (s * s + 1) ** 0.5 * raw)
        zs.append(x)
        ds.append(outs[0] + w * (outs[1] - outs[0]))  # the reference combines the denoised outputs
    return torch.cat(zs), torch.cat(ds)


@pytest.mark.parametrize("which,size", [("tiny", 64), ("sd14", 64)])
def test_whitebox_score_by_hand(which, size, request):
    m = request.getfixturevalue(which)
    seeds = [3, 11, 12, 40]
    with torch.no_grad():
        z, d = _denoised_by_hand(m, seeds, "chelsea the tabby cat looking up", size)
    expected = ((z - d) ** 2).mean(dim=(1, 2, 3))  # StableDiffusionWBAttack: ((z0 - latents)**2).mean()
    attack = OneStep()
    got = attack.evaluate(m, Prompt("p", "chelsea the tabby cat looking up"), seeds, W, (size, size), _ctx(size))
    assert got == pytest.approx(expected.tolist(), rel=1e-5)


def _sobel_by_hand(x, axis):
    """scipy.ndimage.sobel of an H×W×C array: central difference along ``axis``, [1, 2, 1] along the two other
    axes, edges mirrored (scipy 'reflect' = numpy 'symmetric')."""
    p = np.pad(x, 1, mode="symmetric")
    for ax in range(3):
        a, b, c = (np.take(p, range(k, p.shape[ax] - 2 + k), axis=ax) for k in range(3))
        p = c - a if ax == axis else a + 2 * b + c
    return p


def test_edge_map_by_hand():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    img[:, 5:] = 250  # a vertical edge
    x = img.astype(np.float32) / 255
    mag = np.hypot(_sobel_by_hand(x, 0), _sobel_by_hand(x, 1)).sum(axis=2)
    np.testing.assert_array_equal(edge_map(img, 0, 1.5), mag > 1.5)
    assert 0 < (mag > 1.5).mean() < 1
    from PIL import Image

    big = np.asarray(Image.fromarray(img).resize((256, 256), resample=Image.LANCZOS)).astype(np.float32) / 255
    mag = np.hypot(_sobel_by_hand(big, 0), _sobel_by_hand(big, 1)).sum(axis=2)
    np.testing.assert_array_equal(edge_map(img, 256, 1.5), mag > 1.5)


def test_edge_scores_and_blackbox_ranking_by_hand():
    """Maps [[1,0],[1,0]], [[1,1],[0,0]], [[0,0],[0,1]]: mean [[2/3,1/3],[1/3,1/3]] → majority [[1,0],[0,0]]
    (score 1/4); overlaps 1/4, 1/4, 0; densities 1/2, 1/2, 1/4."""
    maps = [np.array(m, bool) for m in ([[1, 0], [1, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 1]])]
    caption, overlap, density = edge_scores(maps, 0.5)
    assert caption == 0.25 and overlap.tolist() == [0.25, 0.25, 0.0] and density.tolist() == [0.5, 0.5, 0.25]
    attack = OneStep(OneStep.make_params({"mode": "blackbox"}))
    order, scores, per_prompt = attack.rank([30, 20, 10], maps)
    assert order == [1, 0, 2] and scores == [0.25, 0.25, 0.0]  # equal overlap and density: seed 20 before 30
    assert per_prompt == {"edge_score_all": 0.25, "edge_score_first_3": 0.25}
    order, scores, per_prompt = OneStep().rank([30, 20, 10], [1.0, 3.0, 3.0])
    assert order == [2, 1, 0] and per_prompt == {"score_first_seed": 1.0, "score_mean": 7 / 3, "score_max": 3.0}


def test_memorized_prompts_score_higher_on_the_embedded_model(tiny):
    """The white-box score separates the embedded model's memorized prompts from its non-memorized ones (the
    reference keeps the *top* scores)."""
    from memobench.registry import get_registry

    reg = get_registry()
    mem = reg.get("prompt_set", "tiny-mem")().prompts(None)[:3]
    non = reg.get("prompt_set", "tiny-nonmem")().prompts(None)[:3]
    attack = OneStep()

    def mean_score(ps):
        return np.mean([attack.evaluate(tiny, p, [0, 1, 2], W, (64, 64), _ctx(64)) for p in ps])

    assert mean_score(mem) > mean_score(non)


@pytest.mark.parametrize("kv,msg", [({"mode": "greybox"}, "mode"), ({"candidates": 0}, "candidates"),
                                    ({"guidance_scale": -1.0}, "guidance_scale"), ({"edge_size": -2}, "edge_size"),
                                    ({"majority": 1.0}, "majority"), ({"edge_threshold": -0.5}, "edge_threshold")])
def test_bad_parameters(kv, msg):
    with pytest.raises(BadInput, match=f"onestep' parameter {msg}"):
        OneStep.make_params(kv)


def test_ls_lists_onestep_with_descriptions(cli_inproc, monkeypatch):
    from dataclasses import fields

    from memobench.api import param_help

    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "attacks"])
    assert rc == 0, err
    text = " ".join(out.split())
    assert "onestep" in text
    for f in fields(OneStep.Params):
        help_ = param_help(OneStep, f.name)
        assert help_ and f"{f.name}={f.default!r} — {' '.join(help_.split())}" in text, f.name


def _run(tmp_path, **params):
    cfg = RunConfig(model="tiny", limit=1, seeds=[0, 1], num_inference_steps=2, metrics=["mr"],
                    cache_dir=str(tmp_path / "c"), offline=True, output_dir=str(tmp_path / "out"),
                    attack="onestep", attack_params={k: str(v) for k, v in params.items()})
    return Runner(cfg, progress=False).run()


@pytest.mark.parametrize("mode", ["whitebox", "blackbox"])
def test_end_to_end_on_the_embedded_model(tmp_path, tiny, mode):
    """candidates=5 on the first tiny-vm prompt: the picks are recomputed here from raw UNet calls (white box) or
    from the decoded one-step images through the numpy Sobel (black box)."""
    res = _run(tmp_path, candidates=5, mode=mode).result
    (pid, tr), = res["attack_traces"].items()
    assert "mr" in res["metrics"] and "mr" in res["metrics_without_attack"]
    assert tr["mode"] == mode and tr["mem_type"] == "VM" and tr["guidance_scale"] == W
    from memobench.registry import get_registry

    prompt = next(p for p in get_registry().get("prompt_set", "tiny-vm")().prompts(None) if p.id == pid)
    seeds = [seed_base(prompt.sha256, 0) + i for i in range(5)]
    with torch.no_grad():
        z, d = _denoised_by_hand(tiny, seeds, prompt.text, 64)
    if mode == "whitebox":
        score = ((z - d) ** 2).mean(dim=(1, 2, 3)).tolist()
        key = [(-score[i], seeds[i]) for i in range(5)]
    else:
        from PIL import Image

        maps = []
        for im in tiny.decode(d):
            x = np.asarray(Image.fromarray(im).resize((256, 256), resample=Image.LANCZOS)).astype(np.float32) / 255
            maps.append(np.hypot(_sobel_by_hand(x, 0), _sobel_by_hand(x, 1)).sum(axis=2) > 1.5)
        e = np.stack(maps).astype(float)
        m = e.mean(0) > 0.5
        key = [(-(e[i] * m).mean(), -e[i].mean(), seeds[i]) for i in range(5)]
        assert tr["edge_score_all"] == pytest.approx(m.mean()) and "edge_score_first_4" in tr
    picks = [seeds[i] for i in sorted(range(5), key=lambda i: key[i])[:2]]
    assert tr["picked_seeds"] == picks
    assert OneStep(OneStep.make_params({"candidates": 5})).budget() == 5.0


def test_fewer_candidates_than_seeds_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="candidates=1: must be ≥ the run's number of seeds"):
        _run(tmp_path, candidates=1)


def test_zero_terminal_snr_is_bad_input(sd14):
    sched = sd14.scheduler
    saved = sched.alphas_cumprod.clone()
    sched.alphas_cumprod[-1] = 0.0
    try:
        with pytest.raises(BadInput, match="zero terminal SNR"):
            OneStep().evaluate(sd14, Prompt("p", "x"), [0], W, (64, 64), _ctx(64))
    finally:
        sched.alphas_cumprod.copy_(saved)

