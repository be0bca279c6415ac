"""One-step extraction: score candidate seeds from a single denoising step and publish the best (attack).

Paper: Webster, "A Reproducible Extraction of Training Images from Diffusion Models", arXiv 2305.08694 (the
white-box "denoising confidence" score and the black-box edge-consistency score of one-step generations).
Reference code ``ryanwebster90/onestep-extraction`` (fb4aa65), read for this module: ``run_wb_attack.py`` and
``custom_ksampler_wb_attack.py`` (white box), ``run_bb_attack.py``, ``custom_ksampler.py`` and
``utils/processing_utils.py`` (``get_edge_img``, ``get_edge_intersection_score``; black box),
``configs/run_{wb,bb}_attack_30k.sh`` (seeds per caption). memobench ``METHODS.md`` §0.3 and §2.2 (Webster's
TV/MV/RV labels are not NeMo's VM/TM). Issue 29 item 2.

Registers the attack ``onestep`` (``needs_reference = False``). **The one step** [CODE]: Webster samples with
k-diffusion's Heun sampler on Karras sigmas with ``num_inference_steps = 1``, i.e. the sigma list [σ_max, 0] with
σ_max = √((1 − ᾱ_{T−1}) / ᾱ_{T−1}) (T = 1000 training steps), starting from z_T = σ_max·n (n ~ N(0, I) from the
candidate's seed). A Heun step whose next sigma is 0 is an Euler step, so the result is the CFG denoiser output

    x̂_0 = z_T − σ_max · ε̂,   ε̂ = ε_u + w·(ε_c − ε_u),   ε_{u,c} = ε_θ(z_T / √(σ_max² + 1), T − 1, e_{∅,p})

(``CompVisDenoiser``: c_in = 1/√(σ² + 1), the UNet input is √(1 − ᾱ_{T−1})·n; for v-prediction models
``CompVisVDenoiser`` gives the same x̂_0 with ε converted from v, :meth:`memobench.model.DiffusionModel.to_eps`).
w is the pipeline's guidance scale: [CODE] 7.5, the SD v1 default; ``guidance_scale = 0`` (default) takes the
run's guidance scale ([CHOICE]: the deployed setting, 7.5 for SD v1.4 and 3 for the embedded model).

**White box** (``mode = "whitebox"``, default: the paper's main attack, which ranked 2M captions on SD v1) [CODE
``StableDiffusionWBAttack``]: score = mean over latent elements of (z_T − x̂_0)² (= σ_max²·mean ε̂²): a
memorized prompt's one-step prediction moves far from the noise (high score = memorized; the reference keeps
the top scores). One seed per caption in the reference (``n_seeds = 1``).

**Black box** (``mode = "blackbox"``) [CODE ``run_bb_attack`` + ``processing_utils``]: the one-step image
decode(x̂_0) is resized to 256×256 (``edge_size``; PIL Lanczos) and read in [0, 1]; its edge map is
Σ_channels hypot(sobel_axis0, sobel_axis1) > 1.5 (``edge_threshold``; ``scipy.ndimage.sobel`` on the H×W×3
array, so the derivative filter is smoothed across channels as well); over a group of seeds (4 per caption in the
reference) the majority map M = [mean of the maps > 0.5] (``majority``) and the caption's score is mean(M): a
copy has sharp edges after one step in the same places for every seed, other captions give blurry images.

**From a per-caption detector to a seed selector** [CHOICE]. Webster scores captions; a memobench attack publishes
``len(ctx.seeds)`` seeds of a known prompt. Per target prompt, ``candidates`` seeds s_i = b + i, b = the first 31
bits of sha256("onestep" | sha256(p) | ``seed``) ([CHOICE] CONVENTIONS §8; the reference uses seeds 0 … n−1 for
every caption), are scored and the best ``len(ctx.seeds)`` are published as in ``extraction``: the prompt's own
conditioning with ``latents`` = ``model.initial_latents(picks, h, w)``; the runner regenerates (full sampler,
under the mitigation) and scores exactly those. White box: seeds by their own score (descending). Black box: the
majority map M is taken over all candidates and seed s scores mean(E_s ∧ M), the part of the shared edges its
own one-step image has (ties: its edge density mean(E_s), then the seed). The per-prompt scores of the reference
are in the trace (white box: the first candidate's score, as the reference's one seed, with the mean and maximum;
black box: the majority-edge score over the first 4 candidates, as the reference, and over all of them).

**Access** [CHOICE]. Both modes evaluate the model the attack is handed: under the mitigation's ``apply`` (weight
edits, pruning, attention hooks are active), with the prompt's own embedding. An inference-time mitigation's
``condition`` step (embedding adjustment, guidance schedule, initial-noise changes) is not part of the one-step
query: ``ctx.generate`` runs the deployed sampler only at the run's number of steps, and a 1-step DDIM ("leading"
spacing) would start at t = 1, not at σ_max. The runner applies ``condition`` when it regenerates the picks.

Budget: ``candidates`` seeds scored per prompt, each one CFG UNet evaluation (both halves in one call; plus one
VAE decode in black-box mode). ``budget_values`` (10, 25, 50, 100): 10 is the embedded model's default number of
seeds, where every candidate is published (no selection). The trace records per prompt: the mode, the prompt's
``mem_type`` (VM / TM where the prompt set labels it, else None), the per-prompt score(s), σ_max, w, the seed base,
the picked seeds in publishing order with their scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from memobench.api import Attack, AttackOutput, BadInput, Conditioning, hookimpl, param
from memobench_plugins.extraction import seed_base as _seed_base

MODES = ("whitebox", "blackbox")
REFERENCE_GROUP = 4  # seeds per caption of the reference black-box attack (configs/run_bb_attack_30k.sh)


def seed_base(prompt_sha256: str, seed: int) -> int:
    """b: the first 31 bits of sha256("onestep" | prompt sha256 | seed); the candidate seeds are b, b + 1, …"""
    return _seed_base(prompt_sha256, seed, tag="onestep")


def sigma_max(model) -> float:
    """σ_max = √((1 − ᾱ_{T−1}) / ᾱ_{T−1}): the first Karras sigma of a 1-step k-diffusion schedule."""
    a = float(model.alphas_cumprod()[-1])
    if not a > 0:
        raise BadInput("attack 'onestep': the model's last ᾱ_t is 0 (zero terminal SNR), so σ_max is infinite; "
                       "the one-step scores need a finite σ_max")
    return ((1.0 - a) / a) ** 0.5


def one_step(model, noise, e_u, e_c, w: float):
    """Webster's one Heun step from σ_max to 0 for unit noise ``noise`` (B×C×h×w): ``(z_T, x̂_0)`` in fp32."""
    import torch

    s = sigma_max(model)
    t = int(model.scheduler.config.num_train_timesteps) - 1
    z = noise.float() * s
    x_in = (z / (s * s + 1.0) ** 0.5).to(model.dtype)
    b = x_in.shape[0]
    emb = torch.cat([e_u.expand(b, -1, -1), e_c.expand(b, -1, -1)]).to(model.dtype)
    with torch.no_grad():
        x2 = torch.cat([x_in, x_in])
        eu, ec = model.to_eps(model.unet_output(x2, t, emb), x2, t).float().chunk(2)
    return z, z - s * (eu + w * (ec - eu))


def whitebox_scores(z, x0):
    """Per sample mean((z_T − x̂_0)²) (``StableDiffusionWBAttack``'s ``wb_score``)."""
    return ((z - x0) ** 2).mean(dim=tuple(range(1, z.dim())))


def edge_map(image, size: int, threshold: float):
    """Webster's ``get_edge_img``: an H×W×3 uint8 image, resized to ``size``² (Lanczos; 0 = as is), in [0, 1] →
    boolean map Σ_c hypot(sobel_0, sobel_1) > ``threshold``."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage

    im = Image.fromarray(np.asarray(image))
    if size:
        im = im.resize((size, size), resample=Image.LANCZOS)
    x = np.asarray(im).astype("float32") / 255.0
    mag = np.hypot(ndimage.sobel(x, axis=0), ndimage.sobel(x, axis=1))
    return mag.sum(axis=2) > threshold


def edge_scores(maps, majority: float):
    """``(caption score, per-seed overlap, per-seed density)``: mean of the majority map M = [mean(maps) >
    ``majority``] (``get_edge_intersection_score``), mean(E_s ∧ M) and mean(E_s) per map."""
    import numpy as np

    e = np.stack(maps).astype(np.float32)
    m = e.mean(axis=0) > majority
    return float(m.mean()), (e * m).mean(axis=(1, 2)), e.mean(axis=(1, 2))


class OneStep(Attack):
    """Webster (arXiv 2305.08694) one-step extraction: publish the seeds with the best one-step score."""

    name = "onestep"
    version = "1"
    needs_reference = False
    depends_on_sampler = True  # the run's guidance (default) and one published latent per seed of the run
    budget_param = "candidates"
    budget_unit = "candidate seeds scored (one CFG UNet evaluation each; black box: + one VAE decode)"
    budget_values = (10, 25, 50, 100)

    @dataclass
    class Params:
        mode: str = param("whitebox", "'whitebox': denoising-confidence score of the UNet's one-step output "
                                      "[CODE run_wb_attack] | 'blackbox': edge consistency of one-step images "
                                      "[CODE run_bb_attack]")
        candidates: int = param(100, "candidate seeds scored per prompt (one one-step evaluation each); the best "
                                     "len(seeds) are published [CHOICE]")
        guidance_scale: float = param(0.0, "CFG scale w of the one step; 0 = the run's guidance scale [CHOICE] "
                                           "(the reference: the pipeline default 7.5 = SD v1's)")
        seed: int = param(0, "with the prompt's sha256, sets the candidate seeds b, b + 1, … (CONVENTIONS §8)")
        edge_size: int = param(256, "black box: side the one-step image is resized to before edges [CODE]; "
                                    "0 = the generation size")
        edge_threshold: float = param(1.5, "black box: edge where Σ_channels of the Sobel magnitude exceeds this "
                                           "[CODE]")
        majority: float = param(0.5, "black box: a pixel is a shared edge when more than this fraction of the "
                                     "candidates has an edge there [CODE]")

        def __post_init__(self):
            what = "attack 'onestep' parameter"
            if self.mode not in MODES:
                raise BadInput(f"{what} mode={self.mode!r}: must be 'whitebox' or 'blackbox'")
            if self.candidates < 1:
                raise BadInput(f"{what} candidates={self.candidates}: must be ≥ 1")
            for k in ("guidance_scale", "edge_size", "edge_threshold"):
                if getattr(self, k) < 0:
                    raise BadInput(f"{what} {k}={getattr(self, k)}: must be ≥ 0")
            if not 0 <= self.majority < 1:
                raise BadInput(f"{what} majority={self.majority}: must be in [0, 1)")

    def candidate_seeds(self, prompt) -> list[int]:
        b = seed_base(prompt.sha256, self.params.seed)
        return [b + i for i in range(self.params.candidates)]

    def evaluate(self, model, prompt, seeds: list[int], w: float, size: tuple[int, int], ctx) -> list:
        """Per candidate, in batches of the run's batch size: the white-box score (a float) or the black-box edge
        map (a boolean array)."""
        e_u, e_c = model.empty_embedding(), model.encode_prompt(prompt.text)
        bs = ctx.batch_size or 8
        out: list = []
        with ctx.task(f"onestep {prompt.id}: {self.params.mode}", len(seeds), transient=True) as advance:
            for i in range(0, len(seeds), bs):
                chunk = seeds[i: i + bs]
                noise = model.initial_latents(chunk, *size) / model.scheduler.init_noise_sigma
                z, x0 = one_step(model, noise, e_u, e_c, w)
                if self.params.mode == "whitebox":
                    out.extend(float(v) for v in whitebox_scores(z, x0))
                else:
                    p = self.params
                    out.extend(edge_map(im, p.edge_size, p.edge_threshold) for im in model.decode(x0.to(model.dtype)))
                advance(len(chunk))
        return out

    def rank(self, seeds: list[int], evaluated: list) -> tuple[list[int], list[float], dict]:
        """Candidate indices best first, the per-seed score of each candidate and the per-prompt scores."""
        import numpy as np

        if self.params.mode == "whitebox":
            s = np.asarray(evaluated, dtype=np.float64)
            order = sorted(range(len(seeds)), key=lambda i: (-s[i], seeds[i]))
            return order, s.tolist(), {"score_first_seed": float(s[0]), "score_mean": float(s.mean()),
                                       "score_max": float(s.max())}
        caption, overlap, density = edge_scores(evaluated, self.params.majority)
        order = sorted(range(len(seeds)), key=lambda i: (-overlap[i], -density[i], seeds[i]))
        n = min(REFERENCE_GROUP, len(seeds))
        first, _, _ = edge_scores(evaluated[:n], self.params.majority)
        return order, overlap.astype(float).tolist(), {"edge_score_all": caption, f"edge_score_first_{n}": first}

    def run(self, model, prompt, reference, ctx) -> AttackOutput:
        from memobench.api import generation_size

        p = self.params
        k = len(ctx.seeds)
        if p.candidates < k:
            raise BadInput(f"attack 'onestep' parameter candidates={p.candidates}: must be ≥ the run's number of "
                           f"seeds ({k}), the number of seeds the attacker publishes")
        size = generation_size(model, ctx)
        w = p.guidance_scale or float(ctx.generation.get("guidance_scale", 7.5))
        seeds = self.candidate_seeds(prompt)
        order, scores, per_prompt = self.rank(seeds, self.evaluate(model, prompt, seeds, w, size, ctx))
        order = order[:k]
        picks = [seeds[i] for i in order]
        cond = Conditioning(model.encode_prompt(prompt.text), model.empty_embedding(), text=prompt.text,
                            latents=model.initial_latents(picks, *size))
        trace = {
            "mode": p.mode, "mem_type": prompt.mem_type, **per_prompt, "candidates": p.candidates,
            "guidance_scale": w, "sigma_max": sigma_max(model),
            "timestep": int(model.scheduler.config.num_train_timesteps) - 1, "seed": p.seed,
            "seed_base": seeds[0], "candidate_seeds": f"{seeds[0]} + i, i = 0..{p.candidates - 1}",
            "picked_seeds": picks, "picked_scores": [scores[i] for i in order],
        }
        return AttackOutput(cond, trace=trace)


@hookimpl
def register_attacks(register):
    register(OneStep)
