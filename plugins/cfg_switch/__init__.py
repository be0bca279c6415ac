"""CFG switch: no (or opposite) guidance until a transition point, then classifier-free guidance.

Paper: Jain, Kobayashi, Shibuya, Takida, Memon, Togelius, Mitsufuji, "Classifier-Free Guidance inside the
Attraction Basin May Cause Memorization", CVPR 2025, arXiv 2411.16738: the attraction basin (§3), the static and
the dynamic transition point (§4), opposite guidance (§4). Reference code ``SonyResearch/mitigating_memorization``
(c6e813c): ``generate_test_dataset_stp.py`` (static transition point, STP), ``generate_test_dataset_dtp.py``
(dynamic transition point, DTP), ``generate_test_dataset-opposite_guidance.py`` (opposite guidance with DTP) and the
README's commands.

Registers the mitigation ``cfg_switch`` (``kind = "inference"``). It changes only the guidance weight w of each
denoising step, ε̂ = ε_u + w·(ε_c − ε_u), through a :class:`memobench.api.Guidance` returned in
``Conditioning.guidance``; the embeddings and the initial latents are the ones it receives.

Idea (§3): for a memorized prompt, CFG applied from the first step pulls the trajectory into an *attraction basin*
that ends in the training image. Inside the basin the guidance magnitude d_t = ‖ε_c(x_t) − ε_u(x_t)‖₂ stays
large and falls; once the trajectory leaves it, d_t rises again. Applying CFG only after that point avoids the
basin while keeping the prompt's content.

Algorithm (per sample, steps i = 0 … N−1, timesteps t_0 > t_1 > …; s = the run's guidance scale)::

    w_i = w_before      while i is before the transition,
    w_i = s             from the transition on.

1. ``mode = "static"`` (STP): the transition is a fixed timestep τ: step i is "before" iff t_i > τ
   (``stp.py``: ``if t > args.guidance_change_step``). τ = ``transition_t``; −1 = the README's value for the
   chosen ``before``: 500 with no guidance (LAION-10K command), 650 with opposite guidance (its OG command).
2. ``mode = "dynamic"`` (DTP, the paper's method for pretrained SD v1.4, README "scenario 4"): during sampling,
   d_i = ‖ε_c(x_{t_i}) − ε_u(x_{t_i})‖₂ over the sample's C×h×w tensor (``dtp.py``: ``torch.norm(noise_pred_uncond -
   noise_pred_text)``, batch size 1, i.e. one norm per sample). The transition is the first local minimum of the
   sequence: at the first step i ≥ 2 with d_i > d_{i−1} and d_{i−2} > d_{i−1} (strict), and step i itself already
   uses w = s (``dtp.py`` sets ``transition_point = t`` and ``guidance_scale = 7.5`` in the same step). Every sample
   of the batch decides for itself (a B-vector of weights). No minimum before the last step: w_before throughout,
   as in the reference (``transition_point`` stays −1).
3. ``before``: ``"none"`` uses ``none_scale``; −1 = the reference's value for the mode: 0.0 in static mode (README
   STP command ``--guidance_scale 0.0``: the unconditional prediction), 1.0 in dynamic mode (``dtp.py``:
   ``guidance_scale = 1.0``: the conditional prediction without CFG amplification). The two scripts disagree on what
   "no guidance" is, hence the parameter. ``"opposite"`` uses ``opposite_scale`` = −2.0, the README's opposite-
   guidance command (``--guidance_scale -2.0`` with transition 650), i.e. ε_u − 2·(ε_c − ε_u), guidance *away*
   from the prompt.

Defaults and sources: ``mode = "dynamic"`` (README: DTP for pretrained SD v1.4), ``before = "none"``,
``none_scale`` −1 (0.0 static / 1.0 dynamic, above), ``opposite_scale`` −2.0 (README OG command), ``transition_t`` −1
(500 / 650, README). The weight after the transition is the run's guidance scale (the reference: 7.5, the model's
CFG scale), so the mitigation changes nothing after the transition.

Choices where the reference differs by necessity or is unclear (recorded in ``Conditioning.trace["cfg_switch"]``):

* Sampler: memobench uses the model plugin's scheduler (DDIM for SD v1.4 and the embedded model); the reference
  scripts use DPM-Solver++ multistep. ``stp.py`` also re-sets the scheduler to a 200-step grid when t equals
  ``guidance_change_step`` exactly; with SD's "leading" spacing (t = 981, 961, …, 501, 481, …) that never happens for
  the README's 500 / 650 (a "linspace" grid can hit t = 500). It is a sampler change, not part of the method, and is
  not reproduced: memobench keeps the run's sampler.
* Dynamic mode with opposite guidance: ``generate_test_dataset-opposite_guidance.py`` finds the transition in a
  separate full pre-pass (w = −7.5, first local minimum of 1 − cos(x_{t−1}, x_t)) and its sampling loop then flips
  the sign of the weight every step and stops at ``exit(0)`` at the transition: it does not run as published.
  memobench detects the transition online with the DTP criterion (local minimum of d_i) while guiding with
  ``opposite_scale`` before it; the static OG command (w = −2.0, τ = 650) is the README's tested configuration.
* ε for v-prediction models: d_i is computed on ε (:meth:`memobench.model.DiffusionModel.to_eps`); the combination
  ε_u + w·(ε_c − ε_u) is the core's, in the model's own parameterisation (equal to combining ε, being linear).
* Trace: the schedule (static: the "before" step indices for the run's step count) or, in dynamic mode, the
  transition step and timestep of every sample denoised, in the order the runner denoised them (−1 = none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memobench.api import BadInput, Conditioning, Guidance, Mitigation, hookimpl, param

if TYPE_CHECKING:  # pragma: no cover
    import torch

MODES = ("static", "dynamic")
BEFORE = ("none", "opposite")
#: README transition timesteps of the static mode: no guidance (LAION-10K command) and opposite guidance
README_TRANSITION_T = {"none": 500, "opposite": 650}
#: the weight of "no guidance" in each reference script: STP README 0.0 (unconditional), dtp.py 1.0 (conditional)
README_NONE_SCALE = {"static": 0.0, "dynamic": 1.0}


def local_minimum_passed(d2: "torch.Tensor", d1: "torch.Tensor", d0: "torch.Tensor") -> "torch.Tensor":
    """The DTP test at step i with norms d0 = d_i, d1 = d_{i−1}, d2 = d_{i−2}: d_i > d_{i−1} and d_{i−2} > d_{i−1}
    (``generate_test_dataset_dtp.py``), elementwise over the batch."""
    return (d0 > d1) & (d2 > d1)


class SwitchGuidance(Guidance):
    """w_before until the transition, then the run's scale; per sample in dynamic mode."""

    def __init__(self, mode: str, before_scale: float, transition_t: float, record: dict | None = None):
        self.mode, self.before_scale, self.transition_t = mode, float(before_scale), float(transition_t)
        self.record = record if record is not None else {}
        self.record.setdefault("transition_step", [])
        self.record.setdefault("transition_timestep", [])

    def start(self, latents, timesteps):
        import torch

        self.n_steps = len(timesteps)
        self.norms: list = []  # d_i, one B-vector per step
        self.switched = torch.zeros(latents.shape[0], dtype=torch.bool, device=latents.device)
        self.step = [-1] * latents.shape[0]
        self.timestep = [-1] * latents.shape[0]

    def scale(self, index, timestep, latents, eps_uncond, eps_cond, guidance_scale):
        import torch

        if self.mode == "static":
            return self.before_scale if float(timestep) > self.transition_t else float(guidance_scale)
        d = (eps_cond.float() - eps_uncond.float()).flatten(1).norm(p=2, dim=1)
        self.norms.append(d)
        if len(self.norms) >= 3:
            new = ~self.switched & local_minimum_passed(self.norms[-3], self.norms[-2], self.norms[-1])
            for b in torch.nonzero(new).flatten().tolist():
                self.step[b], self.timestep[b] = int(index), int(timestep)
            self.switched = self.switched | new
        w = torch.where(self.switched, torch.full_like(d, float(guidance_scale)), torch.full_like(d, self.before_scale))
        if index == self.n_steps - 1:
            self.record["transition_step"].extend(self.step)
            self.record["transition_timestep"].extend(self.timestep)
        return w


class CFGSwitch(Mitigation):
    """Jain et al. (CVPR 2025): no / opposite guidance until the (static or dynamic) transition point, then CFG."""

    name = "cfg_switch"
    version = "1"
    kind = "inference"

    @dataclass
    class Params:
        mode: str = param("dynamic", "'dynamic' (DTP: first local minimum of ‖ε_c−ε_u‖, per sample) | 'static' (STP)")
        before: str = param("none", "guidance before the transition: 'none' | 'opposite' (opposite guidance, §4)")
        none_scale: float = param(-1.0, "w before with before=none; −1 = reference's: 0.0 static (README), 1.0 dynamic"
                                        " (dtp.py)")
        opposite_scale: float = param(-2.0, "w before with before=opposite (README OG command: --guidance_scale -2.0)")
        transition_t: int = param(-1, "static: CFG from the first step with t ≤ this; −1 = README: 500 (none), "
                                      "650 (opposite)")

        def __post_init__(self):
            if self.mode not in MODES:
                raise BadInput(f"mitigation 'cfg_switch' parameter mode={self.mode!r}: must be one of {MODES}")
            if self.before not in BEFORE:
                raise BadInput(f"mitigation 'cfg_switch' parameter before={self.before!r}: must be one of {BEFORE}")
            if self.none_scale != -1 and self.none_scale < 0:
                raise BadInput(f"mitigation 'cfg_switch' parameter none_scale={self.none_scale}: must be ≥ 0 or −1 "
                               "(the reference's); a negative weight is before=opposite")
            if self.opposite_scale >= 0:
                raise BadInput(f"mitigation 'cfg_switch' parameter opposite_scale={self.opposite_scale}: must be < 0 "
                               "(guidance away from the prompt)")
            if self.transition_t != -1 and not 0 <= self.transition_t <= 1000:
                raise BadInput(f"mitigation 'cfg_switch' parameter transition_t={self.transition_t}: must be a "
                               "timestep in 0..1000 or −1 (the README's)")

    def __init__(self, params=None, **overrides):
        super().__init__(params, **overrides)
        self._summaries: dict[str, dict] = {}

    def before_scale(self) -> float:
        """The weight before the transition (the resolved ``none_scale`` or ``opposite_scale``)."""
        p = self.params
        if p.before == "opposite":
            return float(p.opposite_scale)
        return README_NONE_SCALE[p.mode] if p.none_scale == -1 else float(p.none_scale)

    def transition_timestep(self) -> int:
        """The static transition timestep τ (the resolved ``transition_t``)."""
        p = self.params
        return README_TRANSITION_T[p.before] if p.transition_t == -1 else int(p.transition_t)

    def guidance(self, record: dict | None = None) -> SwitchGuidance:
        return SwitchGuidance(self.params.mode, self.before_scale(), self.transition_timestep(), record)

    def condition(self, model, prompt, cond, latents, ctx):
        p = self.params
        gen = dict(ctx.generation or {}) if ctx is not None else {}
        n_steps = int(gen.get("num_inference_steps", 50))
        rec: dict = {"mitigation": "cfg_switch", "mode": p.mode, "before": p.before,
                     "before_scale": self.before_scale(), "guidance_scale": gen.get("guidance_scale")}
        if p.mode == "static":
            tau = self.transition_timestep()
            ts = [int(t) for t in model.timesteps(n_steps)]
            rec.update(transition_t=tau, before_steps=[i for i, t in enumerate(ts) if t > tau])
        g = self.guidance(rec)
        self._summaries[prompt.id] = rec
        return Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds, text=cond.text,
                            trace={**(cond.trace or {}), "cfg_switch": rec}, guidance=g)

    def report(self) -> dict:
        """Per prompt: the static schedule's number of unguided steps, or the dynamic transition steps."""
        out = {}
        for pid, r in self._summaries.items():
            if r["mode"] == "static":
                out[pid] = {"before_steps": len(r["before_steps"])}
            else:
                steps = r.get("transition_step", [])
                found = [s for s in steps if s >= 0]
                out[pid] = {"transition_step": list(steps), "no_transition": len(steps) - len(found),
                            "mean_transition_step": (sum(found) / len(found)) if found else None}
        return {"mode": self.params.mode, "before": self.params.before, "before_scale": self.before_scale(),
                "prompts": out}


@hookimpl
def register_mitigations(register):
    register(CFGSwitch)
