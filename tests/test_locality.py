"""DoRI's locality analyses (``memobench analyze locality``, METHODS §7.4 "Locality diagnostics").

* the statistics on synthetic inputs with known answers: pairwise L2 / its summary, the activation discrepancy
  AD_l(Y) = 2/(n(n−1)) Σ_{i<j} ‖a_i − a_j‖₂, IoU, the mean pairwise IoU (weight agreement) with the empty-set
  convention, NeMo neurons as rows of W_V against a Wanda mask, Wanda's k_min;
* the public selection methods the analysis uses give what ``fit`` gives when the embedding is an encoded prompt
  (``NeMo.select_for_embedding`` = ``NeMo.localize``; ``Wanda.embedding_masks`` = a one-prompt ``Wanda.fit``);
* bad input: one ``error:`` line, exit code 2, before the model loads;
* an end-to-end run of the command on the tiny random pipeline (2 inits, 2 DoRI steps): JSON + PNGs, the NeMo-layer
  activation discrepancy recomputed from ``to_v`` directly, and the DoRI cache on a second run.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from memobench_plugins.locality import analysis as A  # noqa: E402


# ---------------------------------------------------------------------------------------------- statistics
def test_pairwise_l2_known_answers_and_order():
    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(A.pairwise_l2(x), [3.0, 4.0, 5.0])  # (0,1), (0,2), (1,2)
    s = A.distance_summary(A.pairwise_l2(x))
    assert s["mean"] == pytest.approx(4.0) and s["median"] == pytest.approx(4.0) and s["n_pairs"] == 3
    assert s["std"] == pytest.approx(np.sqrt(2 / 3)) and (s["min"], s["max"]) == (3.0, 5.0)
    # rows are flattened: 1×77×d embeddings compare as vectors
    e = np.zeros((2, 1, 77, 4))
    e[1, 0, 5, 2] = 2.0
    np.testing.assert_allclose(A.pairwise_l2(e), [2.0])
    # differences, not a Gram matrix (‖a‖² + ‖b‖² − 2ab would cancel to 0 or NaN here); 1e8 + 1e-3 itself is
    # stored with a relative error of ~2e-6 in float64
    big = np.full((2, 1000), 1e8)
    big[1, 0] += 1e-3
    np.testing.assert_allclose(A.pairwise_l2(big), [1e-3], rtol=1e-5)
    assert A.pairwise_l2(x[:1]).size == 0 and A.distance_summary([])["mean"] is None


def test_activation_discrepancy_matches_the_definition():
    # three embeddings, a layer with 2 tokens × 2 channels
    a = np.zeros((3, 2, 2))
    a[1, 0, 0] = 3.0
    a[2, 1, 1] = 4.0
    # pairs: ‖a0 − a1‖ = 3, ‖a0 − a2‖ = 4, ‖a1 − a2‖ = 5 → 2/(3·2) · 12 = 4
    assert A.activation_discrepancy(a) == pytest.approx(4.0)
    rng = np.random.default_rng(0)
    b = rng.normal(size=(6, 5, 7))
    n = len(b)
    brute = 2 / (n * (n - 1)) * sum(np.linalg.norm(b[i] - b[j]) for i in range(n) for j in range(i + 1, n))
    assert A.activation_discrepancy(b) == pytest.approx(brute, rel=1e-12)
    assert A.activation_discrepancy(a + 7.0) == pytest.approx(4.0)  # translation invariant
    assert A.activation_discrepancy(2 * a) == pytest.approx(8.0)  # scales linearly
    assert A.activation_discrepancy(a[:1]) is None  # one embedding: undefined


def test_iou_and_weight_agreement_known_answers():
    def m(idx, n=13):  # 13: not a multiple of 8 (bit-packing pads)
        v = np.zeros(n, dtype=bool)
        v[list(idx)] = True
        return v

    a, b, c, full = m({0, 1}), m({1, 2}), m(set()), m(range(13))
    assert A.iou(a, b) == pytest.approx(1 / 3)
    assert A.iou(a, c) == 0.0 and A.iou(c, c) == 1.0 and A.iou(c, c, empty=0.0) == 0.0
    assert A.iou(a, full) == pytest.approx(2 / 13) and A.iou(full, full) == 1.0
    # WA = mean over the pairs (a,b), (a,c), (b,c) = (1/3 + 0 + 0) / 3
    np.testing.assert_allclose(A.pairwise_iou([a, b, c]), [1 / 3, 0.0, 0.0])
    assert A.mean_pairwise_iou([a, b, c]) == pytest.approx(1 / 9)
    assert A.mean_pairwise_iou([c, c, c]) == 1.0 and A.mean_pairwise_iou([c, c], empty=0.5) == 0.5
    assert A.mean_pairwise_iou([a]) is None
    # 2-D weight masks and torch tensors are flattened
    w1 = torch.zeros(4, 6, dtype=torch.bool)
    w1[0, :3] = True
    w2 = w1.clone()
    w2[3, 5] = True
    assert A.mean_pairwise_iou([w1, w2]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        A.iou(m({1}), m({1}, n=12))


def test_nemo_neurons_as_rows_against_a_wanda_mask():
    rows = A.rows_mask([1, 1], (3, 4))  # neuron 1 of a 3-output layer = row 1 of W (4 inputs)
    assert rows.sum() == 4 and rows[1].all()
    wanda = np.zeros((3, 4), dtype=bool)
    wanda[1, 0] = wanda[1, 3] = wanda[2, 2] = True
    assert A.iou(rows, wanda) == pytest.approx(2 / 5)  # |∩| = 2, |∪| = 4 + 1
    assert A.mean_paired_iou([rows, rows], [wanda, rows]) == pytest.approx((0.4 + 1.0) / 2)
    assert A.neuron_mask([2], 4).tolist() == [False, False, True, False]
    assert A.mean_paired_iou([], []) is None


def test_weight_space_table_known_answers():
    """The weight-space bars from synthetic selections: 3 embeddings, one NeMo layer (4 neurons, W_V 4×3) with its
    block's ff.net.2 (mask 2×5), and one more Wanda layer outside NeMo's blocks."""
    def mask(shape, idx):
        m = np.zeros(shape, dtype=bool)
        for i in idx:
            m[i] = True
        return m

    layer = {"layer": 1, "value_name": "v1", "width": 4, "value_shape": (4, 3), "ffn_name": "f1"}
    nemo_sets = [[0, 1], [1, 2], []]
    ffn = [mask((2, 5), [(0, 0), (0, 1)]), mask((2, 5), [(0, 1), (1, 4)]), mask((2, 5), [(0, 0), (0, 1)])]
    value = [mask((4, 3), [(0, 0), (3, 2)]), mask((4, 3), [(1, 0), (1, 1), (1, 2)]), mask((4, 3), [])]
    extra = [mask((1, 2), [(0, 0)]), mask((1, 2), [(0, 0)]), mask((1, 2), [(0, 1)])]
    sel = {"Y_adv": [{"nemo": {"refined": [n]}, "wanda": {"f1": f, "v1": v, "fx": x}}
                     for n, f, v, x in zip(nemo_sets, ffn, value, extra)]}
    rows = A.agreement_rows([layer], ["f1", "fx"], sel)
    assert [r["layer"] for r in rows] == [1, None] and rows[1]["ffn_name"] == "fx"
    r = rows[0]
    # NeMo: IoU({0,1},{1,2}) = 1/3, with {} both 0 → WA = 1/9; one of three sets empty
    assert r["nemo_Y_adv"] == pytest.approx(1 / 9) and r["nemo_Y_adv_empty_fraction"] == pytest.approx(1 / 3)
    assert r["nemo_Y_adv_mean_size"] == pytest.approx(4 / 3)
    # Wanda ff.net.2: pairs (1/3, 1, 1/3) → 5/9
    assert r["wanda_Y_adv"] == pytest.approx(5 / 9) and r["wanda_Y_adv_empty_fraction"] == 0.0
    # NeMo vs Wanda on W_V: rows {0,1} (6 weights) vs 2 weights sharing (0,0) → 1/7; rows {1,2} vs row 1 → 3/6;
    # both empty → 1 (the convention); size bounds 2/6, 3/6, 1
    assert r["nemo_vs_wanda_Y_adv"] == pytest.approx((1 / 7 + 1 / 2 + 1) / 3)
    assert r["nemo_vs_wanda_Y_adv_max"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert r["nemo_vs_wanda_Y_adv_empty_fraction"] == pytest.approx(1 / 3)
    assert r["nemo_vs_wanda_Y_adv_mean_sizes"] == pytest.approx([(6 + 6 + 0) / 3, (2 + 3 + 0) / 3])
    assert rows[1]["wanda_Y_adv"] == pytest.approx(1 / 3)  # pairs (1, 0, 0)
    # the empty-set convention and the neuron space: Wanda's rows {0,3}, {1}, {} against NeMo's neurons
    r0 = A.agreement_rows([layer], ["f1"], sel, space="neurons", empty=0.0)[0]
    assert r0["nemo_vs_wanda_Y_adv"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert r0["nemo_Y_adv"] == pytest.approx(1 / 9) and len(A.agreement_rows([layer], ["f1"], sel)) == 1
    # a block whose ff.net.2 is not among Wanda's layers gets no Wanda bar
    assert "wanda_Y_adv" not in A.agreement_rows([layer], ["fx"], sel)[0]


def test_wanda_k_min():
    assert int(A.k_min_skill_ratio(0.01, 64, 1) * 64) == 1  # ρ·in < 1: raised to one candidate per row
    assert int(A.k_min_skill_ratio(0.01, 64, 3) * 64) == 3
    assert A.k_min_skill_ratio(0.01, 768, 1) == 0.01  # SD-1.4 value layers: 7 candidates, unchanged
    assert A.k_min_skill_ratio(0.01, 64, 0) == 0.01


def test_projection_pca():  # (t-SNE runs in the end-to-end test)
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(9, 3, 4))
    c, info = A.project_2d(pts, "pca", seed=0)
    assert c.shape == (9, 2) and info["method"] == "pca" and sum(info["explained_variance_ratio"]) <= 1 + 1e-9
    c2, _ = A.project_2d(pts, "pca", seed=5)
    np.testing.assert_allclose(c, c2)  # deterministic
    # the first coordinate is the projection on the direction of largest variance
    line = np.outer(np.arange(5.0), [3.0, 4.0])
    c3, info3 = A.project_2d(line, "pca")
    np.testing.assert_allclose(np.abs(c3[:, 0]), np.abs(5 * (np.arange(5.0) - 2)), atol=1e-9)
    assert info3["explained_variance_ratio"][0] == pytest.approx(1.0)


def test_params_validation():
    with pytest.raises(ValueError, match="n-inits"):
        A.LocalityParams(n_inits=1)
    with pytest.raises(ValueError, match="projection"):
        A.LocalityParams(projection="umap")
    with pytest.raises(ValueError, match="init"):
        A.LocalityParams(dori={"init": "prompt"})
    with pytest.raises(ValueError, match="threshold"):
        A.LocalityParams(threshold=1.5)


# ---------------------------------------------------------------------------------------------- NeMo / Wanda API
@pytest.fixture(scope="module")
def small_model(tiny_pipe):
    from memobench.model import DiffusionModel

    return DiffusionModel.from_pretrained(str(tiny_pipe), offline=True)


def test_selection_for_an_embedding_equals_the_prompt_path(small_model, tmp_path):
    from memobench.api import Context, Prompt
    from memobench.registry import get_registry

    reg = get_registry()
    nemo_cls, wanda_cls = reg.get("mitigation", "nemo"), reg.get("mitigation", "wanda")
    ctx = Context(cache_dir=tmp_path, nonmem_prompts=[f"a photo of a {w}" for w in
                                                                   "cat dog house tree car boat".split()])
    text = "a red square on a blue background"
    emb = small_model.encode_prompt(text)
    nemo = nemo_cls(samples_per_prompt=3, pairwise_threshold=-1.0, initial_threshold=2.0, refinement_threshold=-1.0,
                    k_init=2)
    rec = nemo.select_for_embedding(small_model, emb, ctx, label=text)
    nemo.fit(small_model, [Prompt("p", text, "VM")], ctx)
    fitted = nemo.neuron_sets[Prompt("p", text).sha256]
    assert rec["refined"] == fitted and any(rec["refined"])
    assert [n for n, _ in nemo.layers(small_model)] == rec["layers"]
    wanda = wanda_cls(skill_ratio=0.2, num_inference_steps=4, timesteps=2)
    masks = wanda.embedding_masks(small_model, emb)
    wanda.fit(small_model, [Prompt("p", text, "VM")], ctx)
    fitted = wanda.masks_for(Prompt("p", text))
    assert masks.keys() == fitted.keys() and all(torch.equal(masks[n], fitted[n]) for n in masks)
    assert any(bool(m.any()) for m in masks.values())
    # other layers (the value projections) and a per-layer ratio
    value = nemo.layers(small_model)
    vm = wanda.embedding_masks(small_model, emb, layers=value, skill_ratio={value[0][0]: 0.5})
    assert [tuple(vm[n].shape) for n, _ in value] == [tuple(m.weight.shape) for _, m in value]
    assert int(vm[value[0][0]].sum(dim=1).max()) <= int(0.5 * value[0][1].in_features)


# ---------------------------------------------------------------------------------------------- CLI
def _shim(reg, tmp_path) -> list[str]:
    if "locality" in {p["name"] for p in reg.plugins}:
        return []
    shim = tmp_path / "shim"  # entry point not (re)installed yet: register the plugin module as a one-off file
    shim.mkdir(exist_ok=True)
    (shim / "locality_shim.py").write_text("from memobench_plugins.locality import register_commands  # noqa\n")
    return ["--plugins-dir", str(shim)]


@pytest.mark.parametrize("args, needle", [
    (["--target", "astronaut", "--n-inits", "1"], "--n-inits"),
    (["--target", "no-such-prompt"], "--target"),
    (["--target", "astronaut", "--projection", "umap"], "--projection"),
    (["--target", "astronaut", "--dori-param", "seed=3"], "--dori-param"),
    (["--target", "astronaut", "--dori-param", "nope=1"], "--dori-param"),
    (["--target", "astronaut", "--model", "nosuchmodel"], "Unknown model"),
    (["--target", "astronaut", "--mitigation", "wen"], "--mitigation"),
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path, cli_inproc, tiny_pipe):
    from memobench.registry import get_registry

    rc, out, err = cli_inproc([*_shim(get_registry(), tmp_path), "analyze", "locality", "--model-param",
                               f"path={tiny_pipe}", *args, "-o", tmp_path / "out", "--cache-dir", tmp_path / "c",
                               "--offline", "--no-progress"])
    assert rc == 2, (out, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not (tmp_path / "out" / "tiny").exists()


def test_cli_smoke_two_inits_two_dori_steps(tiny_pipe, tmp_path, cli_inproc):
    from memobench.model import DiffusionModel
    from memobench.registry import get_registry

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [*_shim(get_registry(), tmp_path), "analyze", "locality", "--model", "tiny", "--model-param",
            f"path={tiny_pipe}", "--target", "astronaut", "--n-inits", "2", "--dori-param", "steps=2",
            "--seeds", "0-1", "--gen-steps", "2", "--projection", "tsne", "--nemo-param", "samples_per_prompt=3",
            "--wanda-param", "num_inference_steps=4", "--wanda-param", "timesteps=2", "--out", out,
            "--cache-dir", cache, "--offline", "--no-progress", "--weight-mem"]
    t0 = time.time()
    rc, stdout, err = cli_inproc([*args, "--workers", "2"])  # the selections in two spawned processes
    elapsed = time.time() - t0
    assert rc == 0, err
    folder = out / "tiny" / "locality" / "astronaut"
    r = json.loads((folder / "locality.json").read_text())
    assert r["schema"] == "memobench.locality/1" and r["target"]["id"] == "astronaut"
    for name in ("input_space.png", "activation_space.png", "weight_space.png", "generations.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(r["figures"].values()) >= {"input_space.png", "activation_space.png", "weight_space.png"}

    inp = r["input_space"]
    assert inp["n_inits"] == 2 and inp["dori"]["seeds"] == [0, 1] and inp["dori"]["params"]["init"] == "gaussian"
    assert inp["dori"]["params"]["steps"] == 2 and inp["generation_seeds"] == [0, 1]
    for row in inp["per_init"]:
        assert len(row["sscd_per_seed"]) == 2 and row["score"] == pytest.approx(np.mean(row["sscd_per_seed"]))
        assert row["success"] == (row["score"] > 0.7) and not row["cached"]
    assert inp["success_rate"] == sum(x["success"] for x in inp["per_init"]) / 2
    assert inp["pairwise_l2"]["adversarial"]["n_pairs"] == 1 and inp["pairwise_l2"]["nonmem_prompts"]["n_pairs"] > 1
    assert isinstance(inp["finding"]["statement"], str) and inp["projection"]["method"] == "tsne"
    assert inp["projection"]["perplexity"] < 2 * 2 + 1 + len(inp["projection"]["coords"]["nonmem_prompts"])
    assert len(inp["projection"]["coords"]["results"]) == 2

    # activation space: the NeMo rows are AD of the to_v outputs, which depend on the embedding only — recompute
    act = r["activation_space"]
    assert act["Y_adv"]["n"] == 2 and {row["family"] for row in act["layers"]} == {"nemo", "wanda"}
    model = DiffusionModel.from_pretrained(str(tiny_pipe), offline=True)
    texts = [q for q in act["Y_mem"]["prompt_ids"]]
    from memobench_plugins.tiny import TinyVM

    mem = {p.id: p.text for p in TinyVM().prompts(None)}
    emb = model.encode_prompt([mem[i] for i in texts])
    for row in act["layers"]:
        if row["family"] != "nemo":
            continue
        with torch.no_grad():
            a = model.unet.get_submodule(row["name"])(emb).float().numpy()
        assert row["Y_mem"] == pytest.approx(A.activation_discrepancy(a), rel=1e-4)

    w = r["weight_space"]
    assert w["processes"] == 2 and w["torch_threads_per_process"] == 1
    assert w["Y_adv"]["n"] == 2 and w["layers"] and all(row["layer"] is not None for row in w["layers"])
    for row in w["layers"]:
        for k in ("nemo_Y_adv", "wanda_Y_adv", "nemo_vs_wanda_Y_adv", "nemo_Y_mem", "wanda_Y_mem"):
            assert row[k] is None or 0.0 <= row[k] <= 1.0
    assert len(w["selections"]["Y_adv"]) == 2 and len(w["selections"]["Y_mem"]) == len(texts)
    assert r["timing"]["total_s"] > 0 and "locality" in stdout

    # a second run reuses the cached DoRI results (same embeddings); its selections, made in this process, are
    # those the two worker processes made
    rc, _, err = cli_inproc([*args, "--workers", "1", "--projection", "pca"])
    assert rc == 0, err
    r2 = json.loads((folder / "locality.json").read_text())
    assert all(x["cached"] for x in r2["input_space"]["per_init"])
    assert r2["input_space"]["projection"]["method"] == "pca"
    assert [x["y_adv_sha256"] for x in r2["input_space"]["per_init"]] == [x["y_adv_sha256"] for x in inp["per_init"]]
    assert [x["sscd_per_seed"] for x in r2["input_space"]["per_init"]] == [x["sscd_per_seed"] for x in inp["per_init"]]
    w2 = r2["weight_space"]
    assert w2["processes"] == 1 and w2["selections"] == w["selections"] and w2["layers"] == w["layers"]
    # and the weight space can be skipped
    rc, _, err = cli_inproc([*args, "--no-weight-space"])
    assert rc == 0, err
    r3 = json.loads((folder / "locality.json").read_text())
    assert r3["weight_space"] is None and "weight_space" not in r3["figures"]
    print(f"\nlocality smoke: first run {elapsed:.1f} s (timing {r['timing']})")
