"""ε- and v-prediction models through the model adapter (the embedded ``tiny`` model and SD 2 768-v are
v-prediction; SD v1.4 and SD 2 base are ε-prediction).

* the adapter's denoising loop reproduces ``StableDiffusionPipeline.__call__`` for a v-prediction model;
* ``eps`` / ``from_eps`` / ``step_eps`` convert exactly between the parameterisations (ε = √ᾱ·v + √(1−ᾱ)·x_t);
* guiding in ε-space and stepping with ``step_eps`` (Wen's loops) lands where the native loop does;
* ``diffusion_loss`` is the model's own training loss: ε-MSE, or v-MSE against v = √ᾱ·ε − √(1−ᾱ)·z0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memobench.model import DiffusionModel, quiet_libraries
from memobench_plugins.sd_random.testing import tiny_random_pipeline


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def model(request, tmp_path_factory):
    quiet_libraries()
    pipe = tiny_random_pipeline(seed=3, tokenizer_dir=tmp_path_factory.mktemp("tok"), prediction_type=request.param)
    return DiffusionModel(pipe, model_id=f"random-{request.param}", revision="test")


def test_prediction_type_is_read_from_the_scheduler(model):
    assert model.prediction_type == model.scheduler.config.prediction_type


def test_denoise_reproduces_the_diffusers_pipeline(model):
    seeds, steps, gs, prompt = [0, 1, 2], 6, 3.0, "a red circle to the left of a blue square"
    ours = model.generate(model.encode_prompt(prompt), model.empty_embedding(), seeds, steps, gs)
    out = model.pipe(prompt, generator=[torch.Generator().manual_seed(s) for s in seeds], num_images_per_prompt=3,
                     num_inference_steps=steps, guidance_scale=gs, height=model.resolution, width=model.resolution,
                     output_type="np").images
    ref = (out * 255).round().astype("uint8")
    assert np.abs(ref.astype(int) - ours.astype(int)).max() <= 1


def _xt(model, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn((2, *model.latent_shape()), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    return z0, noise, model.add_noise(z0, noise, t)


def test_eps_conversion_matches_the_definition(model):
    t = torch.tensor([999, 400])
    z0, noise, x = _xt(model, t)
    e = model.encode_prompt(["a photo", "a cat"])
    with torch.no_grad():
        raw = model.unet_output(x, t, e)
        eps = model.eps(x, t, e)
    a = model.alphas_cumprod()[t].view(-1, 1, 1, 1)
    expected = raw if model.prediction_type == "epsilon" else a.sqrt() * raw + (1 - a).sqrt() * x
    torch.testing.assert_close(eps, expected)
    torch.testing.assert_close(model.from_eps(eps, x, t), raw, atol=1e-4, rtol=1e-4)
    # a perfect model's raw output is the training target, and its ε is the noise itself
    torch.testing.assert_close(model.to_eps(model.target(z0, noise, t), x, t), noise, atol=1e-5, rtol=1e-5)


def test_step_eps_equals_the_native_step(model):
    steps, gs = 5, 4.0
    e_c, e_u = model.encode_prompt("a blue square"), model.empty_embedding()
    lat = model.initial_latents([7, 8])
    native = model.denoise(e_c, e_u, lat.clone(), steps, gs)
    x = lat.clone()
    with torch.no_grad():
        for t in model.timesteps(steps):  # Wen's loops: guidance on ε, then step_eps
            eu, ec = model.eps(torch.cat([x, x]), t, torch.cat([e_u.expand(2, -1, -1), e_c.expand(2, -1, -1)])).chunk(2)
            x = model.step_eps(eu + gs * (ec - eu), t, x)
    torch.testing.assert_close(x, native, atol=1e-4, rtol=1e-4)
    if model.prediction_type == "v_prediction":  # stepping a v-scheduler with ε (the bug step_eps prevents) differs
        y = lat.clone()
        with torch.no_grad():
            for t in model.timesteps(steps):
                eu, ec = model.eps(torch.cat([y, y]), t, torch.cat([e_u.expand(2, -1, -1),
                                                                   e_c.expand(2, -1, -1)])).chunk(2)
                y = model.scheduler.step(eu + gs * (ec - eu), t, y, eta=0.0, return_dict=False)[0]
        assert (y - native).abs().max() > 0.1


def test_diffusion_loss_is_the_models_training_loss(model):
    t = torch.tensor([950, 30])
    z0, noise, x = _xt(model, t, seed=1)
    e = model.encode_prompt("a green triangle")
    with torch.no_grad():
        raw = model.unet_output(x, t, e.expand(2, -1, -1))
        a = model.alphas_cumprod()[t].view(-1, 1, 1, 1)
        tgt = noise if model.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0
        per = model.diffusion_loss(z0, noise, t, e, per_sample=True)
        torch.testing.assert_close(per, (raw - tgt).pow(2).mean(dim=(1, 2, 3)))
        torch.testing.assert_close(model.diffusion_loss(z0, noise, t, e), per.mean())
        if model.prediction_type == "epsilon":  # bit-identical to the ε-MSE the attacks used before
            ref = torch.nn.functional.mse_loss(model.eps(x, t, e.expand(2, -1, -1)), noise)
            assert torch.equal(model.diffusion_loss(z0, noise, t, e), ref)
        else:  # |v − v̂|² = |ε − ε̂|² / ᾱ_t per sample
            eps_mse = (model.eps(x, t, e.expand(2, -1, -1)) - noise).pow(2).mean(dim=(1, 2, 3))
            torch.testing.assert_close(per, eps_mse / a.flatten(), rtol=1e-3, atol=1e-5)


def test_unsupported_prediction_type_is_a_clear_error(tmp_path):
    pipe = tiny_random_pipeline(seed=0, tokenizer_dir=tmp_path / "tok", prediction_type="sample")
    m = DiffusionModel(pipe, model_id="x0-model", revision="test")
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        m.eps(m.initial_latents([0]), torch.tensor(10), m.empty_embedding())
