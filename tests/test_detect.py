"""Detection (METHODS §6): Wen et al.'s d(p) and token-wise significance, NeMo's memorization score, AUC / ACC /
TPR@1%FPR and the calibrated thresholds, and ``memobench detect`` end to end — on a tiny random Stable Diffusion
pipeline and on synthetic scores with hand-computed answers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from memobench_plugins.detect.bench import split_detector_params  # noqa: E402
from memobench_plugins.detect.nemo import NeMoDetector  # noqa: E402
from memobench_plugins.detect.roc import detection_metrics, fixed_threshold_metrics  # noqa: E402
from memobench_plugins.detect.wen import WenDetector, prompt_token_positions, text_noise_trajectory  # noqa: E402

PROMPT = "a photo of a cat sitting on a red mat"


# ---------------------------------------------------------------------------------------------- fixtures
def _model(tmp_path_factory, dtype):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    pipe = tiny_random_pipeline(tokenizer_dir=tmp_path_factory.mktemp("tok") / "tokenizer")
    return DiffusionModel(pipe, model_id="test", dtype=dtype)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(tmp_path_factory, torch.float32)


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    return _model(tmp_path_factory, torch.float64)


def _det(**kw) -> WenDetector:
    return WenDetector(WenDetector.make_params({k: v for k, v in kw.items()})).resolved(
        {"num_inference_steps": 4, "guidance_scale": 7.5})


# ---------------------------------------------------------------------------------------------- ROC arithmetic
def test_roc_hand_computed_example():
    # pos 0.8, 0.35; neg 0.4, 0.1 → ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1): AUC 0.75; best balanced accuracy 0.75
    # first reached at threshold 0.8; TPR@1%FPR 0.5 at threshold 0.8
    m = detection_metrics([0.8, 0.35], [0.4, 0.1])
    assert m["roc"]["fpr"] == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert m["roc"]["tpr"] == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert m["roc"]["thresholds"][0] is None  # +inf, stored as null
    assert m["auc"] == pytest.approx(0.75)
    assert m["acc"] == pytest.approx(0.75)
    assert m["tpr_at_fpr"] == pytest.approx(0.5)
    assert m["thresholds"]["acc"] == {"threshold": 0.8, "tpr": 0.5, "fpr": 0.0, "balanced_accuracy": 0.75}
    assert m["thresholds"]["fpr"]["threshold"] == 0.8
    assert (m["n_pos"], m["n_neg"]) == (2, 2)


def test_roc_perfect_separation_and_ties():
    m = detection_metrics([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert (m["auc"], m["acc"], m["tpr_at_fpr"]) == (1.0, 1.0, 1.0)
    assert m["thresholds"]["acc"]["threshold"] == 3.0 and m["thresholds"]["fpr"]["threshold"] == 3.0
    # ties across classes: ROC (0,0) → (0.5, 1) → (1, 1); AUC = 0.75 (a tie counts one half)
    t = detection_metrics([1.0, 1.0], [1.0, 0.0])
    assert t["auc"] == pytest.approx(0.75)
    assert t["tpr_at_fpr"] == 0.0
    assert t["thresholds"]["fpr"]["threshold"] is None and "note" in t["thresholds"]["fpr"]


def test_acc_threshold_ties_go_to_the_highest_threshold():
    # balanced accuracy 2/3 at (FPR 0, TPR 1/3) and at (FPR 2/3, TPR 1): equal up to float rounding
    m = detection_metrics([0.9, 0.3, 0.1], [0.5, 0.4, 0.05])
    assert m["acc"] == pytest.approx(2 / 3)
    assert m["thresholds"]["acc"]["threshold"] == 0.9 and m["thresholds"]["acc"]["fpr"] == 0.0


def test_tpr_at_one_percent_fpr_is_strict():
    pos = [5.0] * 10
    # 100 negatives, one above every positive: any threshold that catches a positive has FPR = 1 % (not < 1 %)
    m100 = detection_metrics(pos, [0.0] * 99 + [10.0])
    assert m100["tpr_at_fpr"] == 0.0
    # 101 negatives: FPR 1/101 < 1 % → every positive caught
    m101 = detection_metrics(pos, [0.0] * 100 + [10.0])
    assert m101["tpr_at_fpr"] == 1.0
    assert m101["thresholds"]["fpr"] == {"threshold": 5.0, "tpr": 1.0, "fpr": pytest.approx(1 / 101),
                                         "balanced_accuracy": pytest.approx(1 - 1 / 202)}


def test_auc_equals_mann_whitney_on_random_scores():
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1.0, 1.0, 57), 1)  # rounding makes ties
    neg = np.round(rng.normal(0.0, 1.0, 43), 1)
    u = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (pos.size * neg.size)
    m = detection_metrics(pos, neg)
    assert m["auc"] == pytest.approx(u, abs=1e-12)
    # ACC = the best balanced accuracy over all cut-offs, by brute force
    cuts = np.r_[np.inf, np.unique(np.r_[pos, neg])]
    best = max(((pos >= c).mean() + (neg < c).mean()) / 2 for c in cuts)
    assert m["acc"] == pytest.approx(best)
    thr = m["thresholds"]["acc"]["threshold"]
    assert ((pos >= thr).mean() + (neg < thr).mean()) / 2 == pytest.approx(best)


def test_fixed_threshold_and_bad_inputs():
    f = fixed_threshold_metrics([0.9, 0.5, 0.2], [0.6, 0.1], 0.5)  # rule score > 0.5: TP 1, FP 1
    assert f == {"threshold": 0.5, "rule": "memorized iff score > threshold", "accuracy": pytest.approx(2 / 5),
                 "tpr": pytest.approx(1 / 3), "fpr": pytest.approx(1 / 2)}
    with pytest.raises(ValueError, match="memorized and non-memorized"):
        detection_metrics([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        detection_metrics([float("nan")], [1.0])


def test_detector_params_split_and_validation():
    assert split_detector_params({"score_steps": "1", "nemo.samples": "4"}, ["wen", "nemo"]) == {
        "wen": {"score_steps": "1"}, "nemo": {"score_steps": "1", "samples": "4"}}
    with pytest.raises(ValueError, match="has no parameter bogus"):
        WenDetector.make_params({"bogus": 1})
    with pytest.raises(ValueError, match="significance"):
        WenDetector.make_params({"significance": "sum"})
    p = WenDetector.make_params({"seeds": "3,1", "score_steps": "10"})
    assert p.seeds == (3, 1) and p.score_steps == 10
    r = WenDetector().resolved({"num_inference_steps": 50, "guidance_scale": 3.0, "height": 64, "width": 64})
    assert (r.params.num_inference_steps, r.params.guidance_scale, r.params.height) == (50, 3.0, 64)
    assert r.identity()["name"] == "detect-wen"
    with pytest.raises(ValueError, match="score_steps"):
        WenDetector(WenDetector.make_params({"score_steps": "60"})).resolved({"num_inference_steps": 50})


# ---------------------------------------------------------------------------------------------- Wen d(p)
def test_statistic_matches_hand_computation(model):
    """d(p) = mean over scored steps and generations of ‖ε_c − ε_u‖ along the guided DDIM trajectory."""
    seeds, steps, w = [0, 1], 4, 7.5
    e_p, e_u = model.encode_prompt(PROMPT), model.empty_embedding()
    lat = model.initial_latents(seeds)
    tr = text_noise_trajectory(model, e_p, e_u, lat, steps, w, score_steps=3)
    norms, x = [], lat.clone()
    with torch.no_grad():
        for i, t in enumerate(model.timesteps(steps)):
            for g in range(len(seeds)):  # one image at a time
                xg = x[g: g + 1]
                ec = model.eps(xg, t, e_p)
                eu = model.eps(xg, t, e_u)
                if i < 3:
                    norms.append(float((ec - eu).flatten().norm()))
            eu, ec = model.eps(torch.cat([x, x]), t, torch.cat([e_u.expand(2, -1, -1),
                                                                e_p.expand(2, -1, -1)])).chunk(2)
            x = model.step_eps(eu + w * (ec - eu), t, x)
    assert len(tr.per_step) == 3 and len(tr.per_image) == 2
    assert tr.statistic == pytest.approx(float(np.mean(norms)), rel=1e-4)
    assert tr.per_step[0] == pytest.approx(np.mean(norms[:2]), rel=1e-4)


def test_trajectory_equals_generation_and_grad_path_equals_plain(model):
    det = _det(seeds="0,1,2")
    e_p = model.encode_prompt(PROMPT)
    full = det.trace(model, e_p, significance=True, full=True)
    ref = model.denoise(e_p, model.empty_embedding(), det.initial_latents(model), 4, 7.5)
    assert torch.equal(full.latents, ref)  # the explained images are the images `memobench run` generates
    plain = det.score(model, PROMPT)
    assert plain["score"] == pytest.approx(full.statistic, rel=1e-6)
    assert plain["per_image"] == pytest.approx(full.per_image, rel=1e-6)


def test_significance_shapes_and_step_average(model):
    det1, det3 = _det(seeds="0,1", score_steps=1), _det(seeds="0,1", score_steps=3)
    e_p = model.encode_prompt(PROMPT)
    t1 = det1.trace(model, e_p, significance=True)
    t3 = det3.trace(model, e_p, significance=True)
    L = model.tokenizer.model_max_length
    assert tuple(t1.significance.shape) == (L,) and tuple(t3.significance_per_step.shape) == (3, L)
    assert torch.allclose(t3.significance, t3.significance_per_step.mean(0))
    assert torch.allclose(t3.significance_per_step[0], t1.significance, rtol=1e-5)
    assert t3.latents is None and det3.trace(model, e_p).significance is None
    assert (t3.significance >= 0).all() and t3.significance.sum() > 0


def _fd_grad_norm(fn, e, k: int, h: float = 1e-6) -> float:
    """‖∂fn/∂e[0, k, :]‖ by central differences over every embedding coordinate of token position k."""
    g = torch.zeros(e.shape[-1], dtype=torch.float64)
    for j in range(e.shape[-1]):
        ep, em = e.clone(), e.clone()
        ep[0, k, j] += h
        em[0, k, j] -= h
        g[j] = (fn(ep) - fn(em)) / (2 * h)
    return float(g.norm())


@pytest.mark.parametrize("mode", ["reference", "per_image"])
def test_significance_finite_difference(model64, mode):
    """Significance at step 0 (float64 model) against central differences of the loss it differentiates:
    reference = ‖∂ ‖ε_c − ε_u‖_joint / ∂e_k‖ (one norm over all G images), per_image = mean_g ‖∂‖δ_g‖/∂e_k‖."""
    m = model64
    seeds = [0, 1]
    e_p, e_u = m.encode_prompt(PROMPT), m.empty_embedding()
    lat = m.initial_latents(seeds)
    tr = text_noise_trajectory(m, e_p, e_u, lat, 4, 7.5, score_steps=1, significance=mode)
    t0 = m.timesteps(4)[0]

    def deltas(e):
        with torch.no_grad():
            eu, ec = m.eps(torch.cat([lat, lat]), t0, torch.cat([e_u.expand(2, -1, -1),
                                                                 e.expand(2, -1, -1)])).chunk(2)
        return ec - eu

    positions = [k for k, _ in prompt_token_positions(m.tokenizer, m.tokenize([PROMPT])[0].tolist())]
    for k in (positions[0], positions[-1]):
        if mode == "reference":
            fd = _fd_grad_norm(lambda e: float(deltas(e).flatten().norm()), e_p, k)
        else:
            fd = np.mean([_fd_grad_norm(lambda e, g=g: float(deltas(e)[g].flatten().norm()), e_p, k)
                          for g in range(2)])
        assert float(tr.significance[k]) == pytest.approx(fd, rel=1e-5), (mode, k)
    # d(p) at one step with one generation is the loss itself: its FD gradient norm is the significance
    tr1 = text_noise_trajectory(m, e_p, e_u, lat[:1], 4, 7.5, score_steps=1, significance=mode)
    k = positions[1]
    fd = _fd_grad_norm(lambda e: text_noise_trajectory(m, e, e_u, lat[:1], 4, 7.5, score_steps=1).statistic, e_p, k)
    assert float(tr1.significance[k]) == pytest.approx(fd, rel=1e-5)


def test_token_embeds_attribution_finite_difference_and_same_trajectory(model64):
    """attribution=token_embeds: the significance of position k is ‖∂L/∂w_k‖ for the encoder's *input* token
    embedding w_k (central differences through the frozen text encoder), and the trajectory is the reference's."""
    m = model64
    seeds = [0, 1]
    flags = [p.requires_grad for p in m.text_encoder.parameters()]
    ids = m.tokenize([PROMPT])
    e_p, e_u = m.encode_ids(ids), m.empty_embedding()
    lat = m.initial_latents(seeds)
    tr = text_noise_trajectory(m, e_p, e_u, lat, 4, 7.5, score_steps=1, significance="reference", full=True,
                               token_ids=ids)
    ref = text_noise_trajectory(m, e_p, e_u, lat, 4, 7.5, score_steps=1, significance="reference", full=True)
    assert torch.equal(tr.latents, ref.latents) and tr.statistic == ref.statistic
    assert not torch.allclose(tr.significance, ref.significance)  # a different derivative
    t0 = m.timesteps(4)[0]
    emb = m.text_encoder.get_input_embeddings()
    words = emb(ids).detach()

    def loss(w):
        h = emb.register_forward_hook(lambda mod, inp, out: w)
        try:
            with torch.no_grad():
                e = m.text_encoder(ids)[0]
                eu, ec = m.eps(torch.cat([lat, lat]), t0, torch.cat([e_u.expand(2, -1, -1),
                                                                     e.expand(2, -1, -1)])).chunk(2)
        finally:
            h.remove()
        return float((ec - eu).flatten().norm())

    positions = [k for k, _ in prompt_token_positions(m.tokenizer, ids[0].tolist())]
    for k in (positions[0], positions[-1]):
        assert float(tr.significance[k]) == pytest.approx(_fd_grad_norm(loss, words, k), rel=1e-5), k
    assert [p.requires_grad for p in m.text_encoder.parameters()] == flags  # frozen only inside the trajectory


def test_attribution_param_and_calibration_key():
    with pytest.raises(ValueError, match="attribution"):
        WenDetector.make_params({"attribution": "inputs"})
    a = _det(seeds="0,1")
    b = a.with_params(attribution="token_embeds", significance="per_image")
    assert b.identity() != a.identity()  # results record what explained them
    assert b.scoring().identity() == a.scoring().identity() == a.identity()  # one calibration serves both


def test_token_embeds_needs_token_ids(model):
    det = _det(seeds="0").with_params(attribution="token_embeds")
    with pytest.raises(ValueError, match="token ids"):
        det.trace(model, model.encode_prompt(PROMPT), significance=True)
    assert det.trace(model, model.encode_prompt(PROMPT)).significance is None  # not needed without significance


def test_special_tokens_excluded(model):
    tok = model.tokenizer
    ids = model.tokenize([PROMPT])[0].tolist()
    pos = prompt_token_positions(tok, ids)
    words = tok(PROMPT, add_special_tokens=False).input_ids
    assert [t for _, t in pos] == words
    assert [k for k, _ in pos] == list(range(1, len(words) + 1))
    assert 0 not in [k for k, _ in pos]  # BOS
    assert all(t not in tok.all_special_ids for _, t in pos)  # EOS / padding
    eos_at = len(words) + 1
    assert ids[0] == tok.bos_token_id and ids[eos_at] == tok.eos_token_id
    # a prompt longer than the context: 75 prompt tokens, the final EOS excluded
    long = " ".join(["cat"] * 100)
    pl = prompt_token_positions(tok, model.tokenize([long])[0].tolist())
    assert len(pl) == tok.model_max_length - 2 and pl[-1][0] == tok.model_max_length - 2
    assert prompt_token_positions(tok, model.tokenize([""])[0].tolist()) == []


# ---------------------------------------------------------------------------------------------- NeMo m(p)
def test_nemo_score_definition(model):
    from memobench_plugins import nemo as N

    det = NeMoDetector(NeMoDetector.make_params({"samples": "4"}))
    out = det.score(model, PROMPT)
    assert len(out["per_seed_max"]) == 4 and out["score"] == pytest.approx(max(out["per_seed_max"]), abs=1e-6)
    # by hand: δ_g on one seed-1 draw at the second DDIM timestep, max over pairs of MS-SSIM
    lat = torch.randn((4, *model.latent_shape()), generator=torch.Generator().manual_seed(1)) \
        * model.scheduler.init_noise_sigma
    t = model.timesteps(50)[1]
    d = N.noise_differences(model, model.encode_prompt(PROMPT), lat, t)
    pairs = [float(N.ms_ssim(d[i: i + 1], d[j: j + 1])[0]) for i in range(4) for j in range(i + 1, 4)]
    assert out["score"] == pytest.approx(max(pairs), abs=1e-5)
    assert out["timestep"] == int(t) == 961
    assert NeMoDetector.fixed_thresholds["tau_mem"] == 0.428


# ---------------------------------------------------------------------------------------------- detect CLI
@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("detect-prompts")
    (d / "mem.txt").write_text("a red square on a blue background\nportrait of a smiling man\nan old lighthouse\n")
    (d / "non.txt").write_text("a photo of a cat\na green circle\na bowl of ramen\n")
    return d


def _detect_args(tiny_pipe, prompt_files, tmp_path, *extra, small: bool = True):
    wen = ["--detector-param", "num_inference_steps=4", "--detector-param", "height=16", "--detector-param",
           "width=16"] if small else []
    return ["detect", "--model", "tiny", "--model-param", f"path={tiny_pipe}", "--memorized",
            str(prompt_files / "mem.txt"), "--nonmemorized", str(prompt_files / "non.txt"), "--cache-dir",
            str(tmp_path / "cache"), "-o", str(tmp_path / "out"), "--no-progress", *wen, *extra]


def test_detect_cli_end_to_end(tiny_pipe, prompt_files, tmp_path, cli_inproc):
    args = _detect_args(tiny_pipe, prompt_files, tmp_path, "--seeds", "0-1")
    rc, out, err = cli_inproc(args)
    assert rc == 0, err
    assert "AUC" in out and "TPR@1%FPR" in out and "wen threshold (acc: max balanced accuracy" in out
    res_path = next((tmp_path / "out" / "tiny" / "detect").glob("*.json"))
    res = json.loads(res_path.read_text())
    d = res["detectors"]["wen"]
    assert d["identity"]["params"]["seeds"] == [0, 1] and d["identity"]["params"]["guidance_scale"] == 3.0
    pos = [r["scores"]["wen"] for r in res["prompts"] if r["label"] == 1]
    neg = [r["scores"]["wen"] for r in res["prompts"] if r["label"] == 0]
    assert len(pos) == len(neg) == 3
    assert d["metrics"]["auc"] == pytest.approx(detection_metrics(pos, neg)["auc"])
    assert (res_path.parent / f"{res['run_id']}.roc.png").stat().st_size > 1000
    cal = json.loads(open(d["calibration_path"]).read())
    assert cal["kind"] == "calibration" and cal["model_key"] == res["model_key"]
    assert cal["thresholds"]["acc"] == d["metrics"]["thresholds"]["acc"]
    # a second run reuses the per-prompt score cache: same numbers
    rc2, _, err2 = cli_inproc(args)
    assert rc2 == 0, err2
    res2 = json.loads(res_path.read_text())
    assert [r["scores"] for r in res2["prompts"]] == [r["scores"] for r in res["prompts"]]


def test_detect_cli_nemo(tiny_pipe, prompt_files, tmp_path, cli_inproc):
    args = _detect_args(tiny_pipe, prompt_files, tmp_path, "--detector", "nemo", "--detector-param", "samples=3",
                        "--json", small=False)
    rc, out, err = cli_inproc(args)
    assert rc == 0, err
    res = json.loads(out)
    m = res["detectors"]["nemo"]
    assert set(m["fixed_thresholds"]) == {"tau_mem", "app_b4"}
    assert all(-1 <= r["scores"]["nemo"] <= 1 for r in res["prompts"])
    assert not math.isnan(m["metrics"]["auc"])


BAD = [
    ("unknown-detector", ["detect", "--detector", "wenn"],
     ["Unknown detector 'wenn'", "Available: anisotropy, bright_ending, memattn, nemo, sail, wen"]),
    ("unknown-detector-param", ["detect", "--detector-param", "bogus=1"], ["no parameter bogus", "valid:"]),
    ("bad-detector-value", ["detect", "--detector-param", "score_steps=many"], ["score_steps", "int"]),
    ("bad-seeds", ["detect", "--seeds", "3-1"], ["--seeds", "empty"]),
    ("seeds-for-nemo", ["detect", "--detector", "nemo", "--seeds", "0-3"], ["--seeds", "nemo.seed"]),
    ("bad-limit", ["detect", "--limit", "0"], ["--limit"]),
    ("unknown-set", ["detect", "--memorized", "tiny-vmm", "--nonmemorized", "tiny-nonmem"],
     ["Unknown prompt set 'tiny-vmm'"]),
    ("missing-file", ["detect", "--memorized", "no/such/file.txt"], ["--memorized: file not found"]),
    ("unwritable-output", ["detect", "-o", "/proc/memobench-out"], ["--output-dir", "cannot write"]),
    # memobench explain
    ("explain-no-source", ["explain"], ["exactly one of PROMPT, --file or --prompt-set"]),
    ("explain-two-sources", ["explain", "a cat", "--prompt-set", "tiny-vm"], ["exactly one of"]),
    ("explain-empty-prompt", ["explain", "  "], ["the prompt is empty"]),
    ("explain-missing-file", ["explain", "--file", "no/such.txt"], ["--file: file not found"]),
    ("explain-bad-rule", ["explain", "a cat", "--threshold-rule", "youden"], ["--threshold-rule", "'youden'"]),
    ("explain-bad-top-k", ["explain", "a cat", "--top-k", "0"], ["--top-k"]),
    ("explain-bad-detector-param", ["explain", "a cat", "--detector-param", "significance=sum"], ["significance"]),
    ("explain-bad-seeds", ["explain", "a cat", "--seeds", "x"], ["--seeds", "'x'"]),
    ("explain-unknown-option", ["explain", "a cat", "--sseds", "1"], ["No such option"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_one_error_line(case, tmp_path, cli_inproc):
    """detect / explain: exit code 2, one stderr line ``error: …``, nothing on stdout, no model loaded."""
    _, argv, needles = case
    out_dir = [] if "-o" in argv else ["-o", str(tmp_path / "o")]
    rc, out, err = cli_inproc([*argv, "--cache-dir", str(tmp_path / "c"), *out_dir])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert out == ""
    if "file not found" in lines[0]:  # the hint offers a prompt-set name only where the option takes one
        assert ("or a prompt-set name" in lines[0]) == (argv[1] != "--file"), lines[0]
