"""The embedded model: SD tokenizer ids, data determinism, the training command (smoke), diffusers loading."""

import json
import subprocess
import sys

import numpy as np
import pytest
from memobench_plugins.tiny import WEIGHTS
from memobench_plugins.tiny import data as D

from memobench_plugins.tiny.tokenizer import load_sd_tokenizer


def test_tokenizer_ids_equal_sd_v14(tmp_path):
    tok = load_sd_tokenizer(tmp_path / "tok")
    # ids of openai/clip-vit-large-patch14 (SD v1.4's tokenizer)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77 and tok.pad_token_id == 49407
    ids = tok("x", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


def test_data_is_deterministic_and_grammar_roundtrips():
    a, ca = D.general_pool(6, seed=3)
    b, cb = D.general_pool(6, seed=3)
    assert ca == cb and np.array_equal(a, b)
    assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8
    for c in D.general_captions()[:50]:
        assert D.parse_caption(c)["objects"]
    held, train = set(D.heldout_captions()), set(D.train_captions())
    assert held and not (held & train)
    with pytest.raises(ValueError):
        D.parse_caption("a pink hexagon")
    for it in D.VM_ITEMS:
        img = D.photo(it.key)
        assert img.shape == (64, 64, 3) and img.std() > 10  # a real photograph, not blank


def test_recipe_without_up_block_cross_attention_routes_text_only_through_nemo_layers():
    """``unet_up_cross_attention=False`` (the shipped default): every cross-attention value projection is one of
    NeMo's down/mid layers; ``True`` gives SD's layout, with up-block cross-attention."""
    from memobench_plugins.nemo import value_layers
    from memobench_plugins.tiny import train as T

    def attn2(unet):
        return [n for n, _ in unet.named_modules() if n.endswith("attn2.to_v")]

    assert T.RECIPE["unet_up_cross_attention"] is False
    plain = T.build_components()["unet"]
    assert attn2(plain) == [n for n, _ in value_layers(plain)] and len(attn2(plain)) == 3
    assert [type(b).__name__ for b in plain.up_blocks] == ["UpBlock2D"] * 3
    sd = T.build_components({"unet_up_cross_attention": True})["unet"]
    assert len(attn2(sd)) == 7 and any(n.startswith("up_blocks") for n in attn2(sd))
    assert [n for n, _ in value_layers(sd)] == attn2(plain)


def test_zoo_train_smoke_resumes_and_loads_in_plain_diffusers(tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "memobench.cli", "zoo", "train", "tiny", "--smoke", "--work-dir", str(work)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((work / "unet_state.json").read_text())
    assert state["step"] == 2
    first = (work / "unet_ema_unet.safetensors").read_bytes()
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # resumes: nothing left to train
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert (work / "unet_ema_unet.safetensors").read_bytes() == first

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(work / "pipeline"))
    assert pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v is not None
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images[0]
    assert img.shape == (64, 64, 3)


@pytest.mark.parametrize("device, msg", [("tpu", "unknown 'tpu'"), ("cuda", "no CUDA device is available")])
def test_zoo_train_rejects_a_bad_device_before_any_work(tmp_path, device, msg):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "memobench.cli", "zoo", "train", "tiny", "--smoke", "--work-dir", str(work),
                        "--device", device], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and msg in r.stdout + r.stderr and "--device" in r.stdout + r.stderr
    assert not work.exists()


def test_train_on_an_explicit_cpu_device_equals_the_default(tmp_path):
    """``device`` moves only the arithmetic: the data stream and inits are drawn on the CPU either way."""
    from memobench_plugins.tiny import train as T

    kw = dict(recipe={**T.SMOKE, "dec_steps": 0}, progress=False, log=lambda m: None)
    T.train(tmp_path / "a", **kw)
    T.train(tmp_path / "b", device="cpu", **kw)
    for f in ("vae_vae", "unet_ema_unet", "unet_opt"):
        assert (tmp_path / "a" / f"{f}.safetensors").read_bytes() == (tmp_path / "b" / f"{f}.safetensors").read_bytes()


def test_shipped_weights_load_in_plain_diffusers():
    """Acceptance: StableDiffusionPipeline.from_pretrained(<shipped path>) generates without memobench code."""
    import torch
    from diffusers import StableDiffusionPipeline

    assert (WEIGHTS / "model_index.json").exists(), f"shipped weights missing at {WEIGHTS}"
    # the weights are stored in fp16 (size budget); on CPU load them as float32, as any diffusers user would
    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS), torch_dtype=torch.float32)
    img = pipe("a red circle", num_inference_steps=5, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()


def test_loading_a_saved_tokenizer_folder_never_writes_into_it(tmp_path):
    import shutil

    d = tmp_path / "tokenizer"
    shutil.copytree(WEIGHTS / "tokenizer", d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    tok = load_sd_tokenizer(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the shipped weights' hash must not change
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_training_is_deterministic_for_a_seed(tmp_path):
    """Two fresh runs of the recipe (a few steps) give bit-identical VAE and UNet weights: every random init and
    draw is seeded (the VAE's init once was not, which made `zoo train` irreproducible)."""
    import hashlib

    from memobench_plugins.tiny import train as T

    recipe = {**T.SMOKE, "vae_steps": 3, "unet_steps": 3, "checkpoint_every": 100}
    sums = []
    for run in ("a", "b"):
        work = tmp_path / run
        T.train(work, work / "pipeline", recipe=recipe, progress=False, log=lambda *a: None)
        sums.append([hashlib.sha256((work / f).read_bytes()).hexdigest()
                     for f in ("vae_vae.safetensors", "dec_vae.safetensors", "unet_unet.safetensors",
                               "unet_ema_unet.safetensors")])
    assert sums[0] == sums[1]


def test_decoder_refinement_trains_only_the_decoder_and_is_exported(tmp_path):
    """The decoder phase leaves the encoder (hence the UNet's training latents) bit-identical, changes the decoder,
    and the exported pipeline carries the refined decoder (run with a photo pool, which the UNet phase must draw)."""
    import torch
    from memobench_plugins.tiny import train as T
    from safetensors.torch import load_file

    work = tmp_path / "w"
    recipe = {**T.SMOKE, "dec_steps": 3, "photo_pool": 8, "frac_photo": 0.25}
    T.train(work, work / "pipeline", recipe=recipe, progress=False, log=lambda *a: None)
    before, after = load_file(str(work / "vae_vae.safetensors")), load_file(str(work / "dec_vae.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    exported = load_file(str(work / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], after[k]) for k in after)


def test_photo_pool_is_deterministic_and_its_captions_avoid_evaluated_words():
    a, ca = D.photo_pool(6, seed=0, res=32)
    b, cb = D.photo_pool(6, seed=0, res=32)
    assert a.shape == (6, 32, 32, 3) and np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, D.photo_pool(6, seed=1, res=32)[0])
    evaluated = {w for c in [it.caption for it in D.VM_ITEMS + D.TM_ITEMS] + list(D.NONMEM_PROMPTS) for w in c.split()}
    assert all(3 <= len(c.split()) <= 7 for c in ca)
    assert not {w for c in ca for w in c.split()} & evaluated


def test_clip_loss_matches_a_hand_computed_value():
    """CLIP's symmetric InfoNCE on two pairs: embeddings already unit length, logit scale 1 (log 0), so logits are the
    cosines; rows i: −log softmax(l_i)[i], averaged, both directions."""
    import math

    import torch
    from memobench_plugins.tiny.train import clip_loss

    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    same = torch.eye(2, dtype=torch.bool)
    got = clip_loss(t, v, torch.tensor(0.0), same).item()
    # logits t·vᵀ = [[0.6, 0.0], [0.8, 1.0]]
    row = [-math.log(math.exp(0.6) / (math.exp(0.6) + 1)), -math.log(math.exp(1.0) / (math.exp(0.8) + math.exp(1.0)))]
    col = [-math.log(math.exp(0.6) / (math.exp(0.6) + math.exp(0.8))), -math.log(math.exp(1.0) / (1 + math.exp(1.0)))]
    assert got == pytest.approx(0.5 * (sum(row) / 2 + sum(col) / 2), rel=1e-6)
    # equal captions are both positives: the target of a row is uniform over them
    both = torch.ones(2, 2, dtype=torch.bool)
    def uniform_ce(a, b):  # a row (a, b) whose two entries are both positives
        return -0.5 * (math.log(math.exp(a) / (math.exp(a) + math.exp(b)))
                       + math.log(math.exp(b) / (math.exp(a) + math.exp(b))))

    rows = (uniform_ce(0.6, 0.0) + uniform_ce(0.8, 1.0)) / 2
    cols = (uniform_ce(0.6, 0.8) + uniform_ce(0.0, 1.0)) / 2
    want = 0.5 * (rows + cols)
    assert clip_loss(t, v, torch.tensor(0.0), both).item() == pytest.approx(want, rel=1e-6)


def test_issue31_levers_pretrain_the_frozen_encoder_reuse_the_vae_and_delay_the_photos(tmp_path, monkeypatch):
    """The v3 recipe options: the pretrained text encoder is what the UNet phase freezes and exports; the VAE comes
    from an exported pipeline unchanged; two transformer layers per block; no memorized photo before mem_start."""
    import torch
    from memobench_plugins.tiny import train as T
    from safetensors.torch import load_file

    drawn = []
    orig = T._draw_indices

    def spy(rng, r, kinds, n_pool, batch):
        out = orig(rng, r, kinds, n_pool, batch)
        drawn.append(len(out[0]))
        return out

    monkeypatch.setattr(T, "_draw_indices", spy)
    work = tmp_path / "w"
    recipe = {**T.SMOKE, "unet_steps": 4, "text_pretrain_steps": 2, "text_pretrain_batch": 12,
              "unet_transformer_layers": 2, "mem_start_frac": 0.5, "vae_from": str(WEIGHTS)}
    T.train(work, work / "pipeline", recipe=recipe, progress=False, log=lambda *a: None)
    assert drawn[:2] == [0, 0] and all(n > 0 for n in drawn[2:])
    torch.manual_seed(0)
    init = T.build_components({**T.RECIPE, **recipe})["text_encoder"].state_dict()
    pre = load_file(str(work / "text_pretrained.safetensors"))
    assert any(not torch.equal(init[k], pre[k]) for k in pre)
    exported = load_file(str(work / "pipeline" / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(exported[k], pre[k]) for k in pre if k in exported)
    vae = load_file(str(work / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"))
    shipped = load_file(str(WEIGHTS / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae[k], shipped[k].float()) for k in shipped)
    cfg = json.loads((work / "pipeline" / "unet" / "config.json").read_text())
    assert cfg["transformer_layers_per_block"] in (2, [2, 2, 2])
    with pytest.raises(Exception, match="vae_from"):
        T.train(tmp_path / "x", recipe={**recipe, "vae_from": str(tmp_path)}, progress=False, log=lambda *a: None)
