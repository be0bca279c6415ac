"""cfg_switch (Jain et al., CVPR 2025): the static schedule's weights, the dynamic transition decided on crafted
sequences of ε differences, the denoising loop against a hand-written one, parameter checks and ``memobench ls``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memobench.api import BadInput, Conditioning, Context, Prompt
from memobench_plugins.cfg_switch import CFGSwitch

PROMPT = Prompt("p0", "a photo of a cat", mem_type="VM")


def _eps_with_norms(norms: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε_u, ε_c) of a batch of 1×2×2 samples with ‖ε_c − ε_u‖₂ = norms[b] (all mass on one entry)."""
    eu = torch.randn(len(norms), 1, 2, 2)
    ec = eu.clone()
    ec[:, 0, 0, 0] += torch.tensor(norms)
    return eu, ec


def _weights(g, seqs: list[list[float]], s: float = 7.5, timesteps=None) -> list[list[float]]:
    """Feed the guidance one step per column of ``seqs`` (one row per sample); the weight of each sample and step."""
    n = len(seqs[0])
    ts = torch.arange(n * 100, 0, -100) if timesteps is None else timesteps
    g.start(torch.zeros(len(seqs), 1, 2, 2), ts)
    out = []
    for i in range(n):
        eu, ec = _eps_with_norms([row[i] for row in seqs])
        w = g.scale(i, ts[i], None, eu, ec, s)
        out.append(w.tolist() if torch.is_tensor(w) else [w] * len(seqs))
    return [list(col) for col in zip(*out)]


def test_dynamic_transition_at_the_first_local_minimum_per_sample():
    rec: dict = {}
    g = CFGSwitch().guidance(rec)  # dynamic, no guidance before (w = 1, dtp.py)
    seqs = [
        [9.0, 8.0, 7.0, 7.5, 6.0, 5.0],  # minimum at step 2, seen at step 3: CFG from step 3 on
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0],  # decreasing: no transition, never guided
        [9.0, 8.0, 8.0, 9.0, 3.0, 4.0],  # a plateau is no strict minimum (d_{i-2} > d_{i-1} fails at step 3);
                                         # the minimum at step 4 is seen at step 5
        [5.0, 6.0, 5.0, 4.0, 5.0, 1.0],  # the maximum at step 1 is not a transition; minimum at step 3 -> step 4
    ]
    w = _weights(g, seqs)
    s = 7.5
    assert w[0] == [1, 1, 1, s, s, s]
    assert w[1] == [1, 1, 1, 1, 1, 1]
    assert w[2] == [1, 1, 1, 1, 1, s]
    assert w[3] == [1, 1, 1, 1, s, s]  # stays guided after the transition although d keeps changing
    assert rec["transition_step"] == [3, -1, 5, 4]
    assert rec["transition_timestep"] == [300, -1, 100, 200]  # t = 600, 500, …, 100


def test_dynamic_opposite_guidance_before_the_transition():
    g = CFGSwitch(before="opposite").guidance()
    assert _weights(g, [[3.0, 2.0, 1.0, 2.0]], s=5.0) == [[-2.0, -2.0, -2.0, 5.0]]


def test_static_schedule_weights_on_sd14_ddim_timesteps():
    """README STP: w = 0 while t > 500, then the run's scale; with SD v1.4's DDIM 50 steps (steps_offset 1:
    t_i = 981 − 20 i) the first 25 steps (t = 981 … 501) are unguided."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(50)
    ts = sched.timesteps
    assert int(ts[0]) == 981 and int(ts[24]) == 501 and int(ts[25]) == 481
    w = _weights(CFGSwitch(mode="static").guidance(), [[1.0] * 50], s=7.0, timesteps=ts)[0]
    assert w == [0.0] * 25 + [7.0] * 25
    # opposite guidance: −2 while t > 650 (README OG command): t = 981 … 661 are the first 17 steps
    w = _weights(CFGSwitch(mode="static", before="opposite").guidance(), [[1.0] * 50], s=7.0, timesteps=ts)[0]
    assert w == [-2.0] * 17 + [7.0] * 33
    # explicit values
    w = _weights(CFGSwitch(mode="static", none_scale=1.0, transition_t=900).guidance(), [[1.0] * 50], s=7.0,
                 timesteps=ts)[0]
    assert w == [1.0] * 5 + [7.0] * 45  # 981, 961, 941, 921, 901 > 900


@pytest.fixture(scope="module")
def sd14(tmp_path_factory):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")


def test_condition_returns_a_guidance_that_the_loop_applies(sd14):
    """Static, 2 steps with τ between them: step 0 unguided (w = 0), step 1 guided; the loop by hand."""
    ts = sd14.timesteps(2)
    tau = int((int(ts[0]) + int(ts[1])) // 2)
    m = CFGSwitch(mode="static", transition_t=tau)
    pe, ne = sd14.encode_prompt(PROMPT.text), sd14.empty_embedding()
    lat = sd14.initial_latents([0, 1])
    ctx = Context(cache_dir=Path("."), generation={"num_inference_steps": 2, "guidance_scale": 5.0})
    cond = m.condition(sd14, PROMPT, Conditioning(pe, ne, text=PROMPT.text), lat, ctx)
    assert cond.latents is None and cond.prompt_embeds is pe
    assert cond.trace["cfg_switch"]["before_steps"] == [0]
    with torch.no_grad():
        out = sd14.denoise(cond.prompt_embeds, cond.negative_prompt_embeds, lat, 2, 5.0, guidance=cond.guidance)
        x = lat
        for i, t in enumerate(ts):
            o = sd14.unet_output(torch.cat([x, x]), t, torch.cat([ne.expand(2, -1, -1), pe.expand(2, -1, -1)]))
            ou, oc = o.chunk(2)
            x = sd14.scheduler.step(ou + (0.0 if i == 0 else 5.0) * (oc - ou), t, x, eta=0.0, return_dict=False)[0]
    assert torch.allclose(out, x, atol=1e-5)


def test_dynamic_trace_and_report(sd14):
    m = CFGSwitch()
    pe, ne = sd14.encode_prompt(PROMPT.text), sd14.empty_embedding()
    lat = sd14.initial_latents([0, 1, 2])
    ctx = Context(cache_dir=Path("."), generation={"num_inference_steps": 4, "guidance_scale": 5.0})
    cond = m.condition(sd14, PROMPT, Conditioning(pe, ne, text=PROMPT.text), lat, ctx)
    with torch.no_grad():
        sd14.denoise(pe, ne, lat[:2], 4, 5.0, guidance=cond.guidance)  # two batches, as the runner cuts them
        sd14.denoise(pe, ne, lat[2:], 4, 5.0, guidance=cond.guidance)
    steps = cond.trace["cfg_switch"]["transition_step"]
    assert len(steps) == 3 and all(s == -1 or 2 <= s <= 3 for s in steps)
    rep = m.report()["prompts"]["p0"]
    assert rep["transition_step"] == steps and rep["no_transition"] == steps.count(-1)


@pytest.mark.parametrize("kv,msg", [({"mode": "sometimes"}, "mode"), ({"before": "reverse"}, "before"),
                                    ({"none_scale": -0.5}, "none_scale"), ({"opposite_scale": 2.0}, "opposite_scale"),
                                    ({"transition_t": 2000}, "transition_t")])
def test_bad_parameters(kv, msg):
    with pytest.raises(BadInput, match=f"cfg_switch' parameter {msg}"):
        CFGSwitch.make_params(kv)


def test_ls_lists_cfg_switch_with_descriptions(cli_inproc, monkeypatch):
    from memobench.api import param_help

    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "mitigations"])
    assert rc == 0, err
    text = " ".join(out.split())
    assert "cfg_switch" in text
    for name, default in [("mode", "'dynamic'"), ("before", "'none'"), ("none_scale", "-1.0"),
                          ("opposite_scale", "-2.0"), ("transition_t", "-1")]:
        help_ = param_help(CFGSwitch, name)
        assert help_ and f"{name}={default} — {' '.join(help_.split())}" in text, name
