"""Anisotropy: memorization detection by the norm of the guidance plus its angular alignment with the unconditional
score (Asthana & Belagiannis).

Paper: Rohan Asthana, Vasileios Belagiannis, "Detecting and Mitigating Memorization in Diffusion Models through
Anisotropy of the Log-Probability", ICLR 2026 (arXiv 2601.20642). The abstract and README state the method: norm-based
detectors (the text-conditional noise magnitude of Wen et al.) assume an isotropic log-probability, which holds at
high and medium noise; at low noise the log-probability of memorized samples is anisotropic and the guidance vector
aligns with the unconditional score. The metric adds an isotropic norm term (high noise) and an anisotropic angular
term (low noise), both evaluated on *pure noise* x_T with one conditional and one unconditional pass each — no
denoising steps. [The paper's section and equation numbers were not available to this implementation; the formula
below is the reference code's, which the README names as the way to reproduce the paper's detection table.]

Reference code ``rohanasthana/memorization-anisotropy`` (97e991b), read in full for detection: ``detect_mem.py``
(driver, argument defaults), ``run_detection.sh`` (the configuration run: seed 51, one generation, mode "x,c|x",
guidance 7.5, no normalization), ``local_model/pipe.py`` (the ``exp_type == 'det'`` block: what is computed at which
timestep), ``detect_eval.py`` (the combination weights γ and the evaluation). With x = x_T^{(g)} (unchanged initial
noise, ``scale_model_input`` applied), t_0 the first and t_c the third-to-last timestep of the DDIM schedule
(``timesteps[0]`` and ``timesteps[-3]``: 981 and 41 for SD v1.4's 50 steps), ε_u / ε_c the unconditional /
conditional noise predictions::

    N^(g) = ‖ ε_c(x, t_0) − ε_u(x, t_0) ‖₂                                       (norm term, over C×h×w)
    A^(g) = 1/(h·w) Σ_p cos( ε_u(x, t_c)[:, p], (ε_c(x, t_c) − ε_u(x, t_c))[:, p] )  (angle term, per pixel p
                                                                                  over the C channels)
    score = γ₁ · 1/G Σ_g N^(g) + γ₂ · 1/G Σ_g A^(g)

Higher = more likely memorized (``detect_eval.py`` scores the combination with memorized = 1 and no label flip).

Defaults and where each comes from:

* ``gamma_norm`` 1.0, ``gamma_cos`` 2.0: ``detect_eval.py`` for SD v1 (``gamma_1 = 1.0``, ``gamma_2 = 2.0``); SD 2
  uses (1.0, 0.1), Realistic Vision (2, 1): presets ``sd1``, ``sd2``, ``rv`` (:data:`PRESETS`).
* ``samples`` 1, ``seed`` 51: ``run_detection.sh`` (``gen_numbers=(1)``, ``seeds=(51)``; ``set_seed`` before every
  prompt, "invariant to prompt ordering"). [CHOICE] The latents are one CPU draw of (samples, C, h, w) after
  ``manual_seed(seed)``, times the scheduler's initial sigma, the same for every prompt (the reference draws on the
  GPU with the global generator, which a CPU cannot reproduce).
* ``mode`` "x,c|x": ``run_detection.sh`` — the cosine between the unconditional prediction and the guidance
  ε_c − ε_u; the reference's ablations "x,x|c" (ε_c with ε_u) and "x|c,c|x" (ε_c with ε_c − ε_u) are offered.
* ``cosine_over`` "channels": the reference calls ``cosine_similarity(..., dim=1)`` on B×C×h×w tensors — one cosine
  per latent pixel over the channels — and averages the pixels (``j.mean()``). [CHOICE] "flat" takes one cosine of
  the whole C×h×w vectors, as the paper's prose ("angular alignment between the guidance vector and unconditional
  scores") also reads; a parameter because the two differ.
* ``num_inference_steps`` 50 and ``cosine_index`` −3: the pipeline's 50 DDIM steps and ``t_cosine =
  timesteps[-3]``; they fix the two timestep values only. ``height`` / ``width`` 0: the model's default size
  (reference 512 px).
* [CHOICE] ε for v-prediction models: the model's own conversion (:meth:`memobench.api.DiffusionModel.eps`) for both
  terms, i.e. the reference's SD v1 branch for every model. The reference's SD 2 branch uses its own score formula
  for the norm term and the raw v outputs for the angle; it is not reproduced.
* Not offered: ``--normalization`` L1/L2 (the README's configuration uses "None"), ``hvp_sampling_num`` > 1 (later
  denoising steps; the paper's point is the denoising-free score and the configuration uses 1).
* The model's dtype (fp32 on the CPU), norms and cosines in fp32; the reference runs bf16. A cosine with a zero
  vector is 0 (norms clamped at 1e-8, as ``torch.nn.functional.cosine_similarity``).

Registers the detector ``anisotropy``. This module imports neither torch nor diffusers at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from memobench.api import BadInput, Detector, hookimpl, param

#: (gamma_norm, gamma_cos) of ``detect_eval.py`` per model family.
PRESETS: dict[str, dict] = {
    "sd1": {"gamma_norm": 1.0, "gamma_cos": 2.0},
    "sd2": {"gamma_norm": 1.0, "gamma_cos": 0.1},
    "rv": {"gamma_norm": 2.0, "gamma_cos": 1.0},
}
MODES = ("x,c|x", "x,x|c", "x|c,c|x")
COSINE_OVER = ("channels", "flat")


def cosine(a, b, over: str):
    """Per image: the mean over pixels of the cosine over channels (``"channels"``), or one cosine of the flattened
    C×h×w vectors (``"flat"``); a, b: G×C×h×w. Norms are clamped at 1e-8."""
    if over == "flat":
        a, b = a.flatten(1), b.flatten(1)
    dot = (a * b).sum(dim=1)
    cos = dot / (a.norm(dim=1).clamp_min(1e-8) * b.norm(dim=1).clamp_min(1e-8))
    return cos.flatten(1).mean(dim=1) if cos.dim() > 1 else cos


def alignment_pair(eps_u, eps_c, mode: str):
    """The two vectors whose angle the mode measures: (ε_u, ε_c − ε_u), (ε_c, ε_u) or (ε_c, ε_c − ε_u)."""
    if mode == "x,c|x":
        return eps_u, eps_c - eps_u
    if mode == "x,x|c":
        return eps_c, eps_u
    return eps_c, eps_c - eps_u


class AnisotropyDetector(Detector):
    """Asthana & Belagiannis (ICLR 2026): γ₁·‖ε_c − ε_u‖ at t_0 + γ₂·cos(ε_u, ε_c − ε_u) at a low-noise t, on x_T."""

    name = "anisotropy"
    version = "1"
    statistic = "γ₁‖ε_c − ε_u‖(x_T, t_0) + γ₂ cos(ε_u, ε_c − ε_u)(x_T, t_{-3})"

    @dataclass
    class Params:
        gamma_norm: float = param(1.0, "γ₁ of the norm term (detect_eval.py, SD v1; SD 2: 1.0; RV: 2)")
        gamma_cos: float = param(2.0, "γ₂ of the angle term (detect_eval.py, SD v1; SD 2: 0.1; RV: 1)")
        samples: int = param(1, "initial latents per prompt (run_detection.sh gen_numbers=(1))")
        seed: int = param(51, "seed of the one CPU draw of the latents (run_detection.sh seeds=(51))")
        mode: str = param("x,c|x", "angle between: 'x,c|x' ε_u and ε_c−ε_u | 'x,x|c' ε_c, ε_u | 'x|c,c|x' ε_c, "
                                   "ε_c−ε_u")
        cosine_over: str = param("channels", "'channels': per-pixel cosine over C, pixel mean (reference) | 'flat'")
        num_inference_steps: int = param(50, "the DDIM schedule that fixes t_0 and t_c (timestep values only)")
        cosine_index: int = param(-3, "index of t_c in that schedule (reference timesteps[-3]: 41 for SD v1.4)")
        height: int = param(0, "0 = the model's default")
        width: int = param(0, "0 = the model's default")

        def __post_init__(self):
            what = "detector 'anisotropy' parameter"
            if self.mode not in MODES:
                raise BadInput(f"{what} mode={self.mode!r}: one of {', '.join(MODES)}")
            if self.cosine_over not in COSINE_OVER:
                raise BadInput(f"{what} cosine_over={self.cosine_over!r}: one of {', '.join(COSINE_OVER)}")
            if self.samples < 1 or self.num_inference_steps < 1:
                raise BadInput(f"{what} samples, num_inference_steps: at least 1")
            if not -self.num_inference_steps <= self.cosine_index < self.num_inference_steps:
                raise BadInput(f"{what} cosine_index={self.cosine_index}: outside the {self.num_inference_steps} "
                               "timesteps")
            if self.seed < 0 or min(self.height, self.width) < 0:
                raise BadInput(f"{what} seed, height, width: ≥ 0")

    def resolved(self, generation: dict) -> "AnisotropyDetector":
        return self.with_generation(generation)

    def initial_latents(self, model):
        p = self.params
        return model.joint_latents(p.samples, p.seed, p.height or None, p.width or None)

    def terms(self, model, text: str) -> dict:
        """The per-image norm and angle terms and the two timesteps."""
        import torch

        p = self.params
        ts = model.timesteps(p.num_inference_steps)
        t0, tc = ts[0], ts[p.cosine_index]
        x = self.initial_latents(model)
        G = x.shape[0]
        emb = torch.cat([model.empty_embedding().expand(G, -1, -1), model.encode_prompt(text).expand(G, -1, -1)])
        with torch.no_grad():
            eu0, ec0 = model.eps(model.scheduler.scale_model_input(torch.cat([x, x]), t0), t0, emb).float().chunk(2)
            euc, ecc = model.eps(model.scheduler.scale_model_input(torch.cat([x, x]), tc), tc, emb).float().chunk(2)
        norm = (ec0 - eu0).flatten(1).norm(dim=1)
        angle = cosine(*alignment_pair(euc, ecc, p.mode), p.cosine_over)
        return {"norm": norm, "angle": angle, "t0": int(t0), "tc": int(tc)}

    def score(self, model, text: str) -> dict:
        p = self.params
        d = self.terms(model, text)
        norm, angle = float(d["norm"].mean()), float(d["angle"].mean())
        return {"score": p.gamma_norm * norm + p.gamma_cos * angle, "norm_term": norm, "angle_term": angle,
                "per_image_norm": d["norm"].tolist(), "per_image_angle": d["angle"].tolist(),
                "timesteps": [d["t0"], d["tc"]]}


@hookimpl
def register_detectors(register):
    register(AnisotropyDetector)
