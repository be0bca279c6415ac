"""The detection track (issue 29): the detectors memattn, sail, anisotropy and bright_ending — one score each against
a value recomputed here from raw UNet calls on the embedded ``tiny`` model (v-prediction, 16×16×16 latents, three
cross-attention layers) — TPR@3%FPR on a hand-made ROC, the detectors in ``memobench ls detectors`` with every
parameter described, and ``memobench detect`` with the new columns end to end.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from memobench_plugins.detect.roc import detection_metrics, tpr_below  # noqa: E402

MEM = "official portrait of astronaut eileen collins"  # a tiny-vm prompt
NEW = ("memattn", "sail", "anisotropy", "bright_ending")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    from memobench.api import open_model

    torch.set_num_threads(1)
    return open_model("tiny")


@pytest.fixture(scope="module")
def tiny64():
    from memobench.api import open_model

    s = open_model("tiny")
    s.model.set_dtype(torch.float64)
    return s


def _det(session, name, **params):
    from memobench_plugins.detect.bench import make_detector

    return make_detector(name, {k: str(v) for k, v in params.items()}, session.generation)


# ---------------------------------------------------------------------------------------------- raw model calls
def _latents(seeds, m, one_draw_seed=None, n=None):
    """Initial latents as the reference scripts draw them: one generator per seed, or one draw of n."""
    shape = (16, 16, 16)
    if one_draw_seed is not None:
        lat = torch.randn((n, *shape), generator=torch.Generator().manual_seed(one_draw_seed))
    else:
        lat = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    return (lat * m.scheduler.init_noise_sigma).to(m.dtype)


def _alpha_bar(m, t) -> float:
    return float(m.scheduler.alphas_cumprod[int(t)])


def _eps_from_v(m, v, x, t):
    """ε = √ᾱ·v + √(1−ᾱ)·x (the embedded model predicts v)."""
    assert m.scheduler.config.prediction_type == "v_prediction"
    a = _alpha_bar(m, t)
    return math.sqrt(a) * v + math.sqrt(1 - a) * x


def _unet(m, x, t, emb):
    with torch.no_grad():
        return m.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]


class _AttnProbe:
    """Forward pre-hooks on attn2 modules: each call's softmax(Q Kᵀ/√d) recomputed from the module's own inputs,
    (batch, heads, pixels, tokens) in float64."""

    def __init__(self, unet, names):
        self.calls = {n: [] for n in names}
        self.handles = [unet.get_submodule(n).register_forward_pre_hook(self._hook(n), with_kwargs=True)
                        for n in names]

    def _hook(self, name):
        def hook(mod, args, kwargs):
            hs = (args[0] if args else kwargs["hidden_states"]).double()
            enc = kwargs["encoder_hidden_states"].double()
            q = torch.nn.functional.linear(hs, mod.to_q.weight.double())
            k = torch.nn.functional.linear(enc, mod.to_k.weight.double())
            B, P, D = q.shape
            H = mod.heads
            q = q.view(B, P, H, D // H).permute(0, 2, 1, 3)
            k = k.view(B, -1, H, D // H).permute(0, 2, 1, 3)
            self.calls[name].append(((q @ k.transpose(-1, -2)) * (D // H) ** -0.5).softmax(-1))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _entropy(a, start=0):
    a = np.asarray(a, dtype=np.float64)[start:]
    return float(-(a[a > 0] * np.log(a[a > 0])).sum())


def _cfg_trajectory(m, text, x, steps, w, probe_layers=()):
    """The guided DDIM trajectory by raw UNet calls (CFG in the model's v output, scheduler.step): per step the ε
    halves (unconditional, conditional) and, per probed layer, the attention probabilities."""
    e_p = m.encode_prompt(text)
    e_u = m.empty_embedding()
    G = x.shape[0]
    emb = torch.cat([e_u.expand(G, -1, -1), e_p.expand(G, -1, -1)])
    probe = _AttnProbe(m.unet, probe_layers)
    m.scheduler.set_timesteps(steps)
    out_steps = []
    try:
        for t in m.scheduler.timesteps:
            xin = torch.cat([x, x])
            out = _unet(m, xin, t, emb)
            ou, oc = out.chunk(2)
            eu, ec = _eps_from_v(m, out, xin, t).chunk(2)
            out_steps.append((eu.double(), ec.double()))
            x = m.scheduler.step(ou + w * (oc - ou), t, x, eta=0.0, return_dict=False)[0]
    finally:
        probe.close()
    return out_steps, probe.calls


# ---------------------------------------------------------------------------------------------- ROC
def test_tpr_at_3_percent_fpr_hand_made_roc():
    # 50 negatives: two above every positive (FPR 2/50 = 4 % once they are called), one at 0.55 (FPR 1/50 = 2 %)
    pos = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    neg = [2.0, 1.9] + [0.55] + [0.0] * 47
    m = detection_metrics(pos, neg)
    # FPR stays at 2/50 = 4 % ≥ 3 % from the first positive on: only (0, 0) qualifies for 3 % and for 1 %
    assert m["tpr_at_3fpr"] == 0.0 and m["tpr_at_fpr"] == 0.0
    neg2 = [2.0] + [0.55] + [0.0] * 48  # one above all (2 %), one at 0.55 (4 % after it)
    m2 = detection_metrics(pos, neg2)
    # FPR 1/50 = 2 % < 3 % while the positives 0.9 … 0.6 are called (TPR 0.4); 0.55 lifts FPR to 4 %
    assert m2["tpr_at_3fpr"] == pytest.approx(0.4) and m2["tpr_at_fpr"] == 0.0
    assert m2["fpr_max_3"] == 0.03
    # strict: exactly 3 % does not qualify
    assert tpr_below([0.0, 0.03, 0.5], [0.0, 0.7, 1.0], 0.03) == 0.0
    assert tpr_below([0.0, 0.0299, 0.5], [0.0, 0.7, 1.0], 0.03) == 0.7


# ---------------------------------------------------------------------------------------------- detectors, by hand
def test_memattn_mode_e_by_hand(tiny):
    m = tiny.model
    det = _det(tiny, "memattn")
    assert det.params.seeds == (0,) and det.params.num_inference_steps == 50
    out = det.score(m, MEM)
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # the last cross-attention layer of down 1
    probe = _AttnProbe(m.unet, [layer])
    try:
        m.scheduler.set_timesteps(50)
        t0 = m.scheduler.timesteps[0]
        _unet(m, _latents([0], m), t0, m.encode_prompt(MEM))
    finally:
        probe.close()
    (p,) = probe.calls[layer]
    a = p[0].mean(dim=(0, 1)).numpy()  # heads, pixels
    assert out["score"] == pytest.approx(_entropy(a), rel=1e-5)


def test_memattn_mode_d_by_hand(tiny):
    m = tiny.model
    det = _det(tiny, "memattn", mode="D", num_inference_steps=4, last_steps=2, seeds="0,1")
    out = det.score(m, MEM)
    layers = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
              "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
              "mid_block.attentions.0.transformer_blocks.0.attn2"]
    _, calls = _cfg_trajectory(m, MEM, _latents([0, 1], m), 4, 3.0, layers)
    n = len(m.tokenizer(MEM).input_ids)
    per_image = []
    for g in range(2):
        a = [np.mean([calls[lay][s][2 + g].mean(dim=(0, 1)).numpy() for lay in layers], axis=0) for s in range(4)]
        ent = np.mean([_entropy(a[s]) for s in (2, 3)])
        pad = np.mean([_entropy(a[s], n - 1) for s in (2, 3)]) - _entropy(a[0], n - 1)
        per_image.append(ent + pad)
    assert out["per_image"] == pytest.approx(per_image, rel=1e-5)
    assert out["score"] == pytest.approx(np.mean(per_image), rel=1e-5)
    assert out["prompt_length"] == n


def test_anisotropy_by_hand(tiny):
    m = tiny.model
    det = _det(tiny, "anisotropy")
    assert (det.params.seed, det.params.samples, det.params.gamma_norm, det.params.gamma_cos) == (51, 1, 1.0, 2.0)
    out = det.score(m, MEM)
    x = _latents(None, m, one_draw_seed=51, n=1)
    emb = torch.cat([m.empty_embedding(), m.encode_prompt(MEM)])
    m.scheduler.set_timesteps(50)
    t0, tc = m.scheduler.timesteps[0], m.scheduler.timesteps[-3]
    xin = torch.cat([x, x])
    eu0, ec0 = [e.double().numpy() for e in _eps_from_v(m, _unet(m, xin, t0, emb), xin, t0).chunk(2)]
    euc, ecc = [e.double().numpy() for e in _eps_from_v(m, _unet(m, xin, tc, emb), xin, tc).chunk(2)]
    norm = np.linalg.norm((ec0 - eu0).ravel())
    a, b = euc[0], ecc[0] - euc[0]  # C×h×w: one cosine per pixel over the channels
    cos = (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    assert out["timesteps"] == [int(t0), int(tc)] == [981, 41]
    assert out["norm_term"] == pytest.approx(norm, rel=1e-5)
    assert out["angle_term"] == pytest.approx(cos.mean(), rel=1e-4, abs=1e-6)
    assert out["score"] == pytest.approx(norm + 2.0 * cos.mean(), rel=1e-5)
    flat = _det(tiny, "anisotropy", cosine_over="flat").score(m, MEM)
    assert flat["angle_term"] == pytest.approx((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)), rel=1e-4)


def test_sail_sharpness_by_central_differences(tiny64):
    """‖(H_c − H_u) s̃‖ against central differences of s(x) = −ε(x)/σ along s̃ (float64 model)."""
    m = tiny64.model
    det = _det(tiny64, "sail", samples=2)
    assert (det.params.seed, det.params.score_steps) == (42, 1)
    out = det.score(m, MEM)
    x = _latents(None, m, one_draw_seed=42, n=2)
    m.scheduler.set_timesteps(50)
    t = m.scheduler.timesteps[0]
    sigma = math.sqrt(1 - _alpha_bar(m, t))
    emb = torch.cat([m.empty_embedding().expand(2, -1, -1), m.encode_prompt(MEM).expand(2, -1, -1)])

    def s(z):  # both halves: unconditional, conditional
        zz = torch.cat([z, z])
        return (-_eps_from_v(m, _unet(m, zz, t, emb), zz, t) / sigma).chunk(2)

    su, sc = s(x)
    v = sc - su
    h = 1e-5
    (pu, pc), (mu, mc) = s(x + h * v), s(x - h * v)
    comb = (pc - mc) / (2 * h) - (pu - mu) / (2 * h)
    per = comb.flatten(1).norm(dim=1)
    assert out["per_image"] == pytest.approx(per.tolist(), rel=1e-5)
    assert out["score"] == pytest.approx(float(per.mean()), rel=1e-5)


def test_bright_ending_by_hand(tiny):
    m = tiny.model
    det = _det(tiny, "bright_ending", seeds="0,1", num_inference_steps=4)
    out = det.score(m, MEM)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # the down layer at the latent's 16×16
    steps, calls = _cfg_trajectory(m, MEM, _latents([0, 1], m), 4, 3.0, [layer])
    k_end = len(m.tokenizer(MEM).input_ids) - 1
    last = calls[layer][-1]  # (2G, heads, 256, 77): the last step
    assert last.shape[2] == 256
    ld = np.zeros((4, 2))
    for g in range(2):
        mask = last[2 + g, :, :, k_end].mean(0).view(1, 16, 16).numpy()
        for i, (eu, ec) in enumerate(steps):
            d = (ec[g] - eu[g]).numpy()
            ld[i, g] = np.linalg.norm((d * mask).ravel()) / mask.mean()
    assert out["per_step"] == pytest.approx(ld.mean(1).tolist(), rel=1e-4)
    assert out["score"] == pytest.approx(ld.mean(), rel=1e-4)
    first = _det(tiny, "bright_ending", seeds="0,1", num_inference_steps=4, score_steps=1).score(m, MEM)
    assert first["score"] == pytest.approx(ld[0].mean(), rel=1e-4)


def test_detector_parameters_reject_bad_values():
    from memobench.api import BadInput
    from memobench_plugins.detect.bench import make_detector

    for name, params, needle in [("memattn", {"mode": "F"}, "mode"), ("memattn", {"layers": "x"}, "layers"),
                                 ("sail", {"samples": "0"}, "samples"), ("anisotropy", {"mode": "x"}, "mode"),
                                 ("anisotropy", {"cosine_index": "50"}, "cosine_index"),
                                 ("bright_ending", {"mask_layers": "up"}, "mask_layers")]:
        with pytest.raises(BadInput, match=needle):
            det = make_detector(name, params, {"num_inference_steps": 50, "guidance_scale": 7.5})
            if name == "memattn" and params.get("layers"):
                from memobench_plugins.memattn import detection_layers

                detection_layers(["down_blocks.1.attentions.0.transformer_blocks.0.attn2"], det.params.layers, "E")


def test_memattn_layer_selection():
    from memobench_plugins.memattn import detection_layers, forward_order

    sd = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
    up = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in (1, 2, 3) for a in range(3)]
    mid = ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    listed = sd + up + mid  # diffusers' attn_processors order: up blocks before the mid block
    order = forward_order(listed)
    assert order == sd + mid + up and len(order) == 16
    assert detection_layers(listed, "reference", "E") == [order[3]] == ["down_blocks.1.attentions.1"
                                                                       ".transformer_blocks.0.attn2"]
    assert detection_layers(listed, "reference", "D") == order
    assert detection_layers(listed, "0,15", "E") == [order[0], order[15]]


# ---------------------------------------------------------------------------------------------- listing and CLI
def test_ls_detectors_lists_every_parameter_with_help(cli_inproc, monkeypatch):
    import dataclasses

    from memobench.api import param_help
    from memobench.registry import get_registry

    monkeypatch.setenv("COLUMNS", "1000")
    rc, out, err = cli_inproc(["ls", "detectors"])
    assert rc == 0, err
    text = " ".join(out.split())
    reg = get_registry()
    assert set(reg.names("detector")) >= {"wen", "nemo", *NEW}
    for name in ("wen", "nemo", *NEW):
        cls = reg.get("detector", name)
        assert name in text
        for f in dataclasses.fields(cls.Params):
            help_ = param_help(cls, f.name)
            assert help_, f"{name}.{f.name} has no description"
            assert " ".join(f"— {help_}".split()) in text, (name, f.name)


def test_detect_cli_new_detectors_and_columns(tmp_path, cli_inproc, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    mem, non = tmp_path / "mem.txt", tmp_path / "non.txt"
    mem.write_text(MEM + "\nan old lighthouse\n")
    non.write_text("portrait of a smiling firefighter\na bowl of ramen\n")
    args = ["detect", "--model", "tiny", "--memorized", mem, "--nonmemorized", non, "--cache-dir", tmp_path / "c",
            "-o", tmp_path / "o", "--no-progress", "--seeds", "0"]
    for d in NEW:
        args += ["--detector", d]
    args += ["--detector-param", "bright_ending.num_inference_steps=3", "--detector-param", "sail.samples=1"]
    rc, out, err = cli_inproc(args)
    assert rc == 0, err
    assert "TPR@3%FPR" in out and "s/prompt" in out
    res = json.loads(next((tmp_path / "o" / "tiny" / "detect").glob("*.json")).read_text())
    assert list(res["detectors"]) == list(NEW)
    for d in NEW:
        r = res["detectors"][d]
        assert r["metrics"]["n_pos"] == r["metrics"]["n_neg"] == 2
        assert 0.0 <= r["metrics"]["tpr_at_3fpr"] <= 1.0 and r["metrics"]["tpr_at_3fpr"] >= r["metrics"]["tpr_at_fpr"]
        assert r["seconds_per_prompt"] > 0
        assert all(math.isfinite(p["scores"][d]) for p in res["prompts"])
    # --seeds reached the detectors with a seeds parameter, not the others
    assert res["detectors"]["memattn"]["identity"]["params"]["seeds"] == [0]
    assert res["detectors"]["bright_ending"]["identity"]["params"]["seeds"] == [0]
