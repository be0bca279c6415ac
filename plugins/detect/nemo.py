"""NeMo's memorization score as a detection statistic (detector ``nemo``).

Paper: Hintersdorf*, Struppek*, Kersting, Dziedzic, Boenisch, "Finding NeMo: Localizing Neurons Responsible For
Memorization in Diffusion Models", NeurIPS 2024, arXiv 2406.02366: §4 and App. C.7 (the memorization score, the
similarity of the initial noise differences across seeds, and τ_mem = 0.428) and App. B.4 (detection by the score
alone: AUROC 98 %, TPR@1%FPR 87.6 %; accuracy at the fixed threshold 0.5).
Reference code ``ml-research/localizing_memorization_in_diffusion_models`` (f952ede), ``utils/activation_detection.py``
(``compute_noise_diff``, ``calculate_max_pairwise_ssim``). memobench spec: METHODS §6.2 and §7.1.3::

    δ_g = minmax( ε_θ(x_T^(g), t_1, e_p) − x_T^(g) ),   g = 1..10, no CFG (w = 0)
    m(p) = max_{g ≠ g'} MS-SSIM(δ_g, δ_g')                                   (fixed threshold τ_mem = 0.428)

t_1 is the second DDIM timestep of the 50-step schedule (961 for SD-1.4) evaluated on the unchanged initial latent
(§9 #2); the 10 latents come from one CPU draw after ``manual_seed(1)`` (preset ``nemo2024-detect``). MS-SSIM is
torchmetrics' (kernel 11, betas (0.33, 0.33, 0.33)); latents smaller than MS-SSIM's minimum (the embedded ``tiny``
model's 16×16) are nearest-upsampled as the ``nemo`` mitigation does (``small_latent``).

The computation is the NeMo mitigation's own (``memobench_plugins.nemo.noise_differences`` and
``max_pairwise_ms_ssim``, shipped in the same distribution), so the detector and the mitigation's seed filter can
never drift apart; m(p) here is the maximum of that seed filter's per-seed maxima.
"""

from __future__ import annotations

from dataclasses import dataclass

from memobench.api import Detector, param


class NeMoDetector(Detector):
    """NeMo (NeurIPS 2024): m(p), the max pairwise MS-SSIM of the initial noise differences over 10 seeds."""

    name = "nemo"
    version = "1"
    statistic = "m(p) = max pairwise MS-SSIM of δ_g = ε(x_T, t_1, e_p) − x_T over seeds"
    fixed_thresholds = {"tau_mem": 0.428, "app_b4": 0.5}

    @dataclass
    class Params:
        seed: int = param(1, "seed of the one CPU draw of the initial latents (preset nemo2024-detect)")
        samples: int = param(10, "initial noises compared pairwise (at least 2)")
        latent_rule: str = param("nemo", "'nemo': one draw of (samples, C, h, w) | 'per_image': seeds "
                                         "seed..seed+samples-1")
        num_inference_steps: int = param(50, "fixes the DDIM timestep values only")
        timestep_index: int = param(1, "the second DDIM timestep (t_1 = 961 for SD-1.4)")
        guidance_scale: float = param(0.0, "conditional branch only; ≠ 0 is NeMo's 'CFG during detection' ablation")
        msssim_kernel: int = param(11, "MS-SSIM Gaussian kernel size")
        msssim_betas: tuple = param((0.33, 0.33, 0.33), "MS-SSIM weights of its three scales")
        small_latent: str = param("upsample", "'upsample' | 'fewer_scales' | 'error'")
        upsample_to: int = param(64, "side (latent pixels) small latents are nearest-upsampled to "
                                     "(small_latent=upsample)")

        def __post_init__(self):
            self.msssim_betas = tuple(float(b) for b in self.msssim_betas)
            if self.samples < 2:
                raise ValueError("detector 'nemo' parameter samples: at least 2 (pairwise similarity)")
            if self.latent_rule not in ("nemo", "per_image"):
                raise ValueError(f"detector 'nemo' parameter latent_rule: {self.latent_rule!r} not in "
                                 "('nemo', 'per_image')")
            if not 0 <= self.timestep_index < self.num_inference_steps:
                raise ValueError("detector 'nemo' parameter timestep_index: outside the denoising steps")

    def initial_latents(self, model):
        p = self.params
        if p.latent_rule == "nemo":
            return model.joint_latents(p.samples, p.seed)
        return model.initial_latents(list(range(p.seed, p.seed + p.samples)))

    def score(self, model, text: str) -> dict:
        try:
            from memobench_plugins.nemo import max_pairwise_ms_ssim, noise_differences
        except ImportError as e:  # pragma: no cover - same distribution
            raise ValueError(f"detector 'nemo' needs the nemo plugin module: {e}") from None
        p = self.params
        t = model.timesteps(p.num_inference_steps)[p.timestep_index]
        deltas = noise_differences(model, model.encode_prompt(text), self.initial_latents(model), t,
                                   p.guidance_scale)
        m = max_pairwise_ms_ssim(deltas, kernel_size=p.msssim_kernel, betas=p.msssim_betas,
                                 small_latent=p.small_latent, upsample_to=p.upsample_to)
        return {"score": float(m.max()), "per_seed_max": [round(float(v), 6) for v in m], "timestep": int(t)}
