"""NeMo and Wanda mitigations (METHODS §7.1, §7.3; CONVENTIONS §10).

On ``tiny_random_pipeline(sd14_layout=True)`` (SD v1.4's block layout at widths 32/64/128): NeMo's hooks address
exactly the 7 down/mid ``attn2.to_v`` layers and Wanda edits the 16 ``ff.net.2`` layers; both contexts restore the
model exactly (weights and outputs), also after an exception, stay differentiable w.r.t. the prompt embedding and
change the output while active. The score and selection arithmetic (min-max, MS-SSIM, seed filter, the θ/k loop,
refinement) and the Wanda mask are checked on synthetic inputs with known answers.
"""

from __future__ import annotations

import hashlib
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchmetrics")

from memobench.api import Context, Prompt  # noqa: E402
from memobench_plugins import nemo as N  # noqa: E402
from memobench_plugins import wanda as W  # noqa: E402

SD14_VALUE = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 320),
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v", 320),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 640),
    ("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v", 640),
    ("down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v", 1280),
    ("down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v", 1280),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 1280),
]
SCALE = 10  # sd14_layout: block_out_channels (32, 64, 128, 128) vs SD-1.4's (320, 640, 1280, 1280)

PROMPTS = [Prompt("m0", "a red square on a blue background", "VM"), Prompt("m1", "portrait of a smiling man", "VM")]
UTILITY = Prompt("u0", "a green circle", None)
NONMEM = [f"a photo of a {w}" for w in "cat dog house tree car boat bird fish".split()]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(sd14_random_model):
    return sd14_random_model  # tests/conftest.py


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context(cache_dir=tmp_path_factory.mktemp("nw-cache"), nonmem_prompts=NONMEM)


# Cheap but complete NeMo run: every seed passes the filter, the first candidate (θ = 5, k = 2) is accepted and
# refinement keeps everything (τ_ref = -1), so every layer has ≥ 2 blocked neurons.
NEMO_FAST = dict(samples_per_prompt=3, pairwise_threshold=-1.0, initial_threshold=2.0, refinement_threshold=-1.0,
                 k_init=2)


@pytest.fixture(scope="module")
def nemo(model, ctx):
    m = N.NeMo(**NEMO_FAST)
    m.fit(model, PROMPTS, ctx)
    return m


@pytest.fixture(scope="module")
def wanda(model, ctx):
    m = W.Wanda(skill_ratio=0.1, num_inference_steps=4, timesteps=2)
    m.fit(model, PROMPTS, ctx)
    return m


def _state_sha(model) -> str:
    h = hashlib.sha256()
    for part in (model.unet, model.text_encoder, model.vae):
        for k, v in sorted(part.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hooks(model) -> list[str]:
    return [n for n, m in model.unet.named_modules()
            if m._forward_hooks or m._forward_pre_hooks]


def _outputs(model, text: str):
    emb = model.encode_prompt(text)
    lat = model.initial_latents([3])
    with torch.no_grad():
        out = model.denoise(emb, model.empty_embedding(), lat, 3, 3.0)
    return out, model.decode(out)


# ---------------------------------------------------------------------------------------------- layer maps
def test_nemo_value_layers_sd14_layout(model):
    layers = N.value_layers(model.unet)
    assert [n for n, _ in layers] == [n for n, _ in SD14_VALUE]
    assert [m.out_features * SCALE for _, m in layers] == [w for _, w in SD14_VALUE]
    assert sum(w for _, w in SD14_VALUE) == 5760
    assert all(m.in_features == model.unet.config.cross_attention_dim for _, m in layers)
    assert len(N.value_layers(model.unet, "down,mid,up")) == 16


def test_wanda_ffn_layers_sd14_layout(model):
    layers = W.ffn_layers(model.unet)
    names = [n for n, _ in layers]
    assert len(layers) == 16 and all(n.endswith(".ff.net.2") for n in names)
    assert names == sorted(names)  # forward order = ConceptPrune's alphabetical order on SD-1.x
    for n, m in layers:
        c = m.out_features
        assert m.weight.shape == (c, 4 * c)
    assert [m.out_features * SCALE for _, m in layers[:7]] == [w for _, w in SD14_VALUE]
    assert [n for n, _ in W.ffn_layers(model.unet, "0,15")] == [names[0], names[15]]
    with pytest.raises(ValueError):
        W.ffn_layers(model.unet, "16")


def test_nemo_refuses_fused_projections():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8)
    assert len(N.value_layers(unet)) == 2
    unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused"):
        N.value_layers(unet)


# ---------------------------------------------------------------------------------------------- NeMo end to end
def test_nemo_fit_report_and_artifacts(nemo, model, ctx):
    import json
    from pathlib import Path

    rep = nemo.report()
    assert rep["n_prompts"] == 2 and rep["n_memorized"] == 2
    assert list(rep["neurons_per_layer"]) == [n for n, _ in SD14_VALUE]
    assert all(v >= 2 for v in rep["union_per_layer"].values())
    assert rep["median_neurons_per_prompt"] >= 14
    # initial_threshold 2.0: the first candidate set already meets M(B) <= 2 for both prompts
    assert rep["criterion"] == {"threshold": 2.0, "n_met": 2, "n_fallback": 0}
    assert all(v["criterion_met"] is True and v["initial_score"] <= 2.0 for v in rep["per_prompt"].values())
    assert Path(rep["stats"]["file"]).is_file() and rep["stats"]["n_prompts"] == len(NONMEM)
    doc = json.loads(Path(rep["neurons_file"]).read_text())
    assert [x["width"] for x in doc["layers"]] == [w // SCALE for _, w in SD14_VALUE]
    for r in doc["prompts"]:
        assert len(r["refined"]) == 7 and r["seeds_K"] == [0, 1, 2]
        assert r["refined"] == r["initial"] and r["theta"] == 5.0 and r["k"] == 2
        assert all(len(s) == len(set(s)) for s in r["refined"])
    # a second fit reads the cached per-prompt records
    again = N.NeMo(**NEMO_FAST)
    again.fit(model, PROMPTS, ctx)
    assert again.neuron_sets == nemo.neuron_sets
    # the exported file can stand in for localization
    third = N.NeMo(**NEMO_FAST, neurons_file=rep["neurons_file"])
    third.fit(model, PROMPTS, ctx)
    assert third.neuron_sets == nemo.neuron_sets


def test_nemo_report_counts_prompts_that_fall_back_when_the_schedule_runs_out(model, ctx):
    # M(B) >= 0 > initial_threshold for every candidate: θ runs 1.5 -> 1.25 -> 1.0 and the selection keeps the last
    # set with τ_ref = its score (METHODS §7.1.4 step 3d); the report must say so instead of implying success
    m = N.NeMo(**{**NEMO_FAST, "initial_threshold": -1.0, "theta_init": 1.5})
    m.fit(model, PROMPTS, ctx)
    rep = m.report()
    assert rep["criterion"] == {"threshold": -1.0, "n_met": 0, "n_fallback": 2}
    for r in m._records.values():
        assert r["theta"] == 1.25 and r["tau_ref"] == r["initial_score"] > -1.0
    assert all(v["criterion_met"] is False for v in rep["per_prompt"].values())


def test_nemo_hooks_address_exactly_the_value_layers(nemo, model, ctx):
    expected = {n for n, _ in SD14_VALUE}
    assert _hooks(model) == []
    for prompt in (PROMPTS[0], UTILITY, None):
        with nemo.apply(model, prompt, ctx):
            assert set(_hooks(model)) == expected
        assert _hooks(model) == []
    # per-prompt sets differ from the union applied to prompts without an own set
    assert nemo.sets_for(UTILITY) == nemo.union_set() != nemo.sets_for(PROMPTS[0])
    none = N.NeMo(**NEMO_FAST, utility_blocking="none")
    none._records, none._layers = nemo._records, nemo._layers
    assert none.sets_for(UTILITY) == [[]] * 7
    with none.apply(model, UTILITY, ctx):
        assert _hooks(model) == []
    union = N.NeMo(**NEMO_FAST, blocking="union")
    union._records, union._layers = nemo._records, nemo._layers
    assert union.sets_for(PROMPTS[0]) == nemo.union_set()


def test_nemo_hook_scales_selected_channels_only(model):
    layers = N.value_layers(model.unet)
    name, mod = layers[2]
    x = torch.randn(1, 77, mod.in_features)
    ref = mod(x)
    sets = [[] for _ in layers]
    sets[2] = [1, 5, 5]
    with N.block_neurons(layers, sets, 0.25):
        out = mod(x)
    keep = torch.ones(mod.out_features, dtype=torch.bool)
    keep[[1, 5]] = False
    assert torch.equal(out[..., keep], ref[..., keep])
    assert torch.allclose(out[..., [1, 5]], 0.25 * ref[..., [1, 5]])
    assert not mod._forward_hooks


# ---------------------------------------------------------------------------------------------- restoration, grads
def _mitigation(which, nemo, wanda):
    return {"nemo": nemo, "wanda": wanda}[which]


@pytest.mark.parametrize("which", ["nemo", "wanda"])
def test_context_restores_model_exactly_and_changes_output(which, nemo, wanda, model, ctx):
    mit = _mitigation(which, nemo, wanda)
    procs = {k: type(v) for k, v in model.unet.attn_processors.items()}
    params = {n: p for n, p in model.unet.named_parameters()}
    sha0 = _state_sha(model)
    lat0, img0 = _outputs(model, PROMPTS[0].text)
    with mit.apply(model, PROMPTS[0], ctx):
        lat1, _ = _outputs(model, PROMPTS[0].text)
        if which == "wanda":
            assert _state_sha(model) != sha0
    assert not torch.equal(lat0, lat1)  # the mitigation acts
    assert _state_sha(model) == sha0
    lat2, img2 = _outputs(model, PROMPTS[0].text)
    assert torch.equal(lat0, lat2) and (img0 == img2).all()
    with pytest.raises(RuntimeError, match="boom"):
        with mit.apply(model, PROMPTS[0], ctx):
            _outputs(model, PROMPTS[0].text)
            raise RuntimeError("boom")
    assert _state_sha(model) == sha0 and _hooks(model) == []
    assert {k: type(v) for k, v in model.unet.attn_processors.items()} == procs
    assert all(p is params[n] for n, p in model.unet.named_parameters())  # the original Parameter objects
    lat3, img3 = _outputs(model, PROMPTS[0].text)
    assert torch.equal(lat0, lat3) and (img0 == img3).all()


@pytest.mark.parametrize("which", ["nemo", "wanda"])
def test_gradients_flow_to_prompt_embedding(which, nemo, wanda, model, ctx):
    mit = _mitigation(which, nemo, wanda)
    emb = model.encode_prompt(PROMPTS[0].text).clone().requires_grad_(True)
    lat = model.initial_latents([0])
    t = model.timesteps(10)[2]
    with mit.apply(model, PROMPTS[0], ctx), torch.enable_grad():
        loss = model.eps(lat, t, emb).pow(2).mean()
        loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- score arithmetic
def test_minmax_normalisation_per_plane():
    x = torch.stack([torch.arange(16.0).reshape(4, 4), -2 * torch.arange(16.0).reshape(4, 4)])[None]  # 1×2×4×4
    y = N.minmax_normalize(x)
    assert torch.allclose(y[0, 0], torch.arange(16.0).reshape(4, 4) / 15)
    assert torch.allclose(y[0, 1], 1 - torch.arange(16.0).reshape(4, 4) / 15)
    assert torch.equal(N.minmax_normalize(torch.full((1, 1, 4, 4), 3.0)), torch.zeros(1, 1, 4, 4))


def test_ms_ssim_sizes_and_known_values():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm

    assert N.msssim_min_size(3, 11) == 44 and N.msssim_min_size(2, 11) == 11
    g = torch.Generator().manual_seed(0)
    a = N.minmax_normalize(torch.randn(3, 4, 64, 64, generator=g))
    b = N.minmax_normalize(torch.randn(3, 4, 64, 64, generator=g))
    ref = tm(a, b, reduction="none", kernel_size=11, betas=(0.33, 0.33, 0.33))
    assert torch.equal(N.ms_ssim(a, b), ref)  # 64×64 (SD-1.4) is passed through unchanged
    assert torch.allclose(N.ms_ssim(a, a), torch.ones(3), atol=1e-5)
    small_a, small_b = a[..., ::4, ::4].contiguous(), b[..., ::4, ::4].contiguous()  # 16×16 (tiny model)
    up = lambda x: x.repeat_interleave(4, -2).repeat_interleave(4, -1)  # noqa: E731
    assert torch.equal(N.ms_ssim(small_a, small_b), tm(up(small_a), up(small_b), reduction="none", kernel_size=11,
                                                       betas=(0.33, 0.33, 0.33)))
    assert torch.allclose(N.ms_ssim(small_a, small_a), torch.ones(3), atol=1e-5)
    assert N.ms_ssim(small_a, small_b, small_latent="fewer_scales").shape == (3,)
    with pytest.raises(ValueError, match="44"):
        N.ms_ssim(small_a, small_b, small_latent="error")


def test_seed_filter_max_pairwise():
    g = torch.Generator().manual_seed(1)
    base = N.minmax_normalize(torch.randn(1, 4, 16, 16, generator=g))
    other = N.minmax_normalize(torch.randn(2, 4, 16, 16, generator=g))
    d = torch.cat([base, base, other])  # samples 0 and 1 identical, 2 and 3 unrelated noise
    m = N.max_pairwise_ms_ssim(d)
    assert torch.allclose(m[:2], torch.ones(2), atol=1e-5)
    assert (m[2:] < 0.428).all()
    assert (m > 0.428).nonzero().flatten().tolist() == [0, 1]


def test_theta_k_schedule_defaults():
    sched = N.theta_k_schedule()
    assert len(sched) == 16
    assert sched == [(5 - 0.25 * i, i) for i in range(16)]
    assert N.theta_k_schedule(use_theta=False, k_max=5) == [(math.inf, k) for k in range(5)]


def test_candidate_sets_ood_and_top_k():
    a = [torch.tensor([1.0, 10.0, 3.0, 0.5]), torch.tensor([2.0, 3.0])]
    mu = [torch.ones(4), torch.full((2,), 2.0)]
    sd = [torch.ones(4), torch.ones(2)]
    # layer 0: z = |a - μ|/σ = [0, 9, 2, 0.5] → θ = 1.5 selects 1, 2; top-2 by a = [1, 2]; duplicates kept
    # layer 1: z = [0, 1] → nothing above 1.5; top-2 by a = [1, 0]
    assert N.candidate_sets(a, mu, sd, 1.5, 2) == [[1, 2, 1, 2], [1, 0]]
    assert N.candidate_sets(a, mu, sd, 5.0, 0) == [[1], []]
    assert N.candidate_sets(a, mu, sd, 5.0, 9)[1] == [1, 0]  # k capped at the layer width


def test_initial_selection_loop():
    seen = []

    def score(sets):  # fails twice, then succeeds
        seen.append(sets)
        return torch.tensor([0.9, 0.3]) if len(seen) < 3 else torch.tensor([0.2, 0.4])

    a, mu, sd = [torch.tensor([0.0, 1.0, 2.0])], [torch.zeros(3)], [torch.ones(3)]
    r = N.initial_selection(a, mu, sd, score)
    assert r["n_candidates"] == 3 and (r["theta"], r["k"]) == (4.5, 2)
    assert r["score"] == pytest.approx(0.4) and r["tau_ref"] == 0.428
    assert seen == [[[]], [[2]], [[2, 1]]]
    # never below τ: stops after 16 candidates with τ_ref = the last score
    r = N.initial_selection(a, mu, sd, lambda s: 0.9)
    assert r["n_candidates"] == 16 and (r["theta"], r["k"]) == (1.25, 15) and r["tau_ref"] == 0.9


def test_refinement_layer_then_neuron():
    calls = []

    def score(sets):  # memorization is removed iff neuron 5 of layer 2 is blocked
        calls.append([list(s) for s in sets])
        return 0.2 if 5 in sets[2] else 0.9

    start = [[1, 2], [], [7, 5, 9], [3]]
    assert N.refine(start, score, 0.428) == [[], [], [5], []]
    # layer-wise pass first: last layer first, empty layers skipped
    assert calls[0] == [[1, 2], [], [7, 5, 9], []] and calls[1] == [[1, 2], [], [], []]
    assert calls[2] == [[], [], [7, 5, 9], []]
    # relative threshold: |(s - s_all)/s_all| < rel keeps removals that do not change the per-sample scores
    vec = lambda sets: torch.tensor([0.2, 0.3]) if 5 in sets[2] else torch.tensor([0.9, 0.9])  # noqa: E731
    assert N.refine(start, vec, 0.428, rel_threshold=0.01) == [[], [], [5], []]


def test_refinement_duplicates_follow_reference_list_semantics():
    # neuron 4 appears twice (OOD and top-k); the first removal leaves it blocked, so it is tested at its last copy
    def score(sets):
        return 0.2 if {4, 6} <= set(sets[0]) else 0.9

    assert N.refine([[4, 6, 4]], score, 0.5) == [[6, 4]]


# ---------------------------------------------------------------------------------------------- Wanda arithmetic
def test_wanda_step_mask_hand_example():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                      [4.0, 1.0, -1.0, 2.0]])
    nt = torch.tensor([1.0, 1.0, 1.0, 4.0])
    nb = torch.tensor([2.0, 0.5, 1.0, 1.0])
    # S_t = [[1, 2, 3, 2], [4, 1, 1, 8]]; S_b = [[2, 1, 3, .5], [8, .5, 1, 2]]
    # top-2 by S_t: row 0 → {2, 1} (stable: col 1 before col 3), row 1 → {3, 0}
    # S_t > S_b: row 0 → cols 1, 3; row 1 → cols 1, 3
    m = W.wanda_step_mask(w.abs(), nt, nb, 0.5)
    assert m.tolist() == [[False, True, False, False], [False, False, False, True]]
    assert not W.wanda_step_mask(w.abs(), nt, nb, 0.1).any()  # ⌊0.1·4⌋ = 0 columns per row
    assert int(0.01 * 4 * 320) == 12 and int(0.01 * 4 * 640) == 25 and int(0.01 * 4 * 1280) == 51


def test_wanda_union_over_time():
    w = torch.ones(1, 4)
    nb = [torch.zeros(4)] * 3
    nts = [torch.tensor([4.0, 3, 2, 1]), torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 9, 2, 3])]
    # top-1 per step: col 0, col 3, col 1 (all beat the base)
    assert W.wanda_mask(w, nts, nb, 0.25, timesteps=3).tolist() == [[True, True, False, True]]
    assert W.wanda_mask(w, nts, nb, 0.25, timesteps=2).tolist() == [[True, False, False, True]]  # τ_T = 2
    # select_ratio 0.5 with τ_T = 3: pruned iff selected in > 1.5 steps
    nts2 = [torch.tensor([4.0, 3, 2, 1]), torch.tensor([4.0, 2, 3, 1]), torch.tensor([1.0, 9, 2, 3])]
    assert W.wanda_mask(w, nts2, nb, 0.25, timesteps=3, select_ratio=0.5).tolist() == [[True, False, False, False]]
    # S_target must exceed S_base
    assert not W.wanda_mask(w, nts, nts, 0.25, timesteps=3).any()


def test_wanda_fit_groups_and_report(wanda, model, ctx):
    rep = wanda.report()
    assert rep["n_groups"] == 1 and len(rep["per_layer"]) == 16 and rep["pruned_weights"] > 0
    assert rep["layers_sha256_original"] != rep["layers_sha256_pruned_union"]
    from memobench.api import tensors_sha256

    def sha():
        return tensors_sha256({n: m.weight for n, m in W.ffn_layers(model.unet)})

    with wanda.apply(model, PROMPTS[0], ctx):  # the recorded sha256 is that of the weights inside the context
        assert sha() == rep["layers_sha256_pruned_union"]
    assert sha() == rep["layers_sha256_original"]
    first = rep["per_layer"]["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]
    assert first["shape"] == [32, 128] and first["k_per_row_per_step"] == 12
    assert 0 < first["pruned"] <= 32 * 12 * 2  # ≤ k per row per step, 2 steps
    grouped = W.Wanda(skill_ratio=0.1, num_inference_steps=4, timesteps=2, group_size=1)
    grouped.fit(model, PROMPTS, ctx)
    assert grouped.report()["n_groups"] == 2
    m0, m1, mu = grouped.masks_for(PROMPTS[0]), grouped.masks_for(PROMPTS[1]), grouped.masks_for(UTILITY)
    assert all(torch.equal(mu[n], m0[n] | m1[n]) for n in mu)
    assert W.Wanda10().params.skill_ratio == 0.1 and W.Wanda10.name == "wanda10"


def test_params_validation_and_registration():
    with pytest.raises(ValueError):
        N.NeMo.make_params({"blocking": "everything"})
    with pytest.raises(ValueError):
        N.NeMo.make_params({"blocks": "left"})
    assert N.NeMo.make_params({"msssim_betas": "0.5,0.5"}).msssim_betas == (0.5, 0.5)
    with pytest.raises(ValueError):
        W.Wanda.make_params({"timesteps": "0"})
    got = []
    N.register_mitigations(lambda cls, aliases=(): got.append(cls))
    W.register_mitigations(lambda cls, aliases=(): got.append(cls))
    assert [(c.name, c.kind) for c in got] == [("nemo", "weights"), ("wanda", "weights"), ("wanda10", "weights")]
    with pytest.raises(RuntimeError, match="fit"):
        with N.NeMo().apply(None, PROMPTS[0], None):
            pass


@pytest.mark.parametrize("shape, small_latent", [((6, 16, 16, 16), "upsample"), ((3, 4, 64, 64), "upsample"),
                                                 ((4, 4, 32, 32), "fewer_scales")])
def test_ms_ssim_against_a_fixed_target_is_bit_identical_to_ms_ssim(shape, small_latent):
    """NeMo's refinement scores with MSSSIMAgainst (the unblocked side computed once): the same numbers, bit for bit,
    as torchmetrics' MS-SSIM through ms_ssim, in either argument order."""
    from memobench_plugins.nemo.localize import MSSSIMAgainst, minmax_normalize, ms_ssim

    g = torch.Generator().manual_seed(1)
    d0 = minmax_normalize(torch.randn(shape, generator=g))
    against = MSSSIMAgainst(d0, small_latent=small_latent)
    for i in range(4):
        db = minmax_normalize(torch.randn(shape, generator=g) + (d0 if i % 2 else 0))
        want = ms_ssim(d0, db, small_latent=small_latent)
        assert torch.equal(against(db), want)
        assert torch.equal(against(db), ms_ssim(db, d0, small_latent=small_latent))
    assert torch.equal(against(d0), torch.ones(shape[0]))  # identical planes
