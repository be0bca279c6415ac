"""NeMo's UNet calls per prompt are no more than the reference algorithm's (issue 30, goal A).

Paper: Hintersdorf*, Struppek*, Kersting, Dziedzic, Boenisch, "Finding NeMo", NeurIPS 2024 (Alg. 1 initial
selection, Alg. 2 refinement); reference code ``ml-research/localizing_memorization_in_diffusion_models``,
``3_detect_memorized_neurons.py`` with ``utils/activation_detection.py`` (``compute_noise_diff``,
``neuron_refinement``), which does not memoise. memobench: METHODS §7.1.4, ``plugins/nemo/localize.py``.

Counting: every UNet call of memobench goes through ``DiffusionModel.unet_output``; the test wraps it and, as an
independent second count, puts a forward pre-hook on ``model.unet`` — both must agree.

The reference's number of noise-difference evaluations (each one ``compute_noise_diff``, i.e. at least one UNet
call; memobench's δ is exactly one UNet call) for a prompt whose seed filter passes, with the quantities of
memobench's record and ``refine``'s structure (layers tested last to first, a dropped layer's neurons not tested
one by one, duplicates in the candidate list each tested)::

    R = 1                      seed filter: δ of all G samples, unblocked
      + n_candidates           one per (θ, k) candidate set of the initial selection      (record "n_candidates")
      + L_test                 one per non-empty layer of the initial set (layer-wise)    (record "initial")
      + N_test                 one per neuron occurrence of the layers the layer-wise
                               pass kept: Σ_{l kept} |B_l| (the list with duplicates)
      + 1                      the refined set's final score                             (record "refined_score")

``neuron_refinement`` in the reference additionally recomputes the unblocked δ and the all-blocked δ (+2), and with
``early_stopping=1`` each ``compute_noise_diff`` runs the UNet at two DDIM steps and each candidate's
``collect_activations`` one more, so the reference's UNet forward passes are 2·(R + 2) + n_candidates > R. The test
asserts memobench's count ≤ R (the stricter bound), and = 1 + n_evaluations (one unblocked call plus one call per
distinct set in the memo): it fails if the memo stops deduplicating or a call bypasses the count. A prompt whose
seed filter rejects every sample (K = ∅) costs exactly one UNet call (reference: one ``compute_noise_diff``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchmetrics")

from memobench_plugins import nemo as N  # noqa: E402

from memobench.api import Context  # noqa: E402

NONMEM = [f"a photo of a {w}" for w in "cat dog house tree car boat bird fish".split()]
TEXT = "portrait of a smiling man"
# The seed filter passes for every sample (τ_pair = -1); τ_init = 0 is never met, so the initial selection runs its
# whole (θ, k) schedule θ = 7, 6, 5 with k = 0, 1, 2 (3 candidate sets) and falls back to τ_ref = the last score;
# refinement then drops some layers whole and tests the remaining neurons one by one.
MEMORIZED = dict(samples_per_prompt=3, pairwise_threshold=-1.0, initial_threshold=0.0, theta_init=7.0,
                 theta_step=1.0, theta_min=4.0, seed=1)
# Default τ_pair (0.428): the random test model's noise differences are not similar across seeds, so K = ∅.
NOT_MEMORIZED = dict(samples_per_prompt=3, seed=1)


@pytest.fixture(scope="module")
def model(sd14_random_model):
    return sd14_random_model  # tests/conftest.py


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context(cache_dir=tmp_path_factory.mktemp("nemo-calls-cache"), nonmem_prompts=NONMEM)


def _key(sets) -> tuple:
    return tuple(tuple(sorted({int(i) for i in s})) for s in sets)


def _localize_counted(model, ctx, monkeypatch, params: dict):
    """Run ``NeMo.localize`` for TEXT; return (record, UNet calls via unet_output, via the pre-hook, spy log)."""
    nemo = N.NeMo(**params)
    layers = nemo.layers(model)
    means, stds = nemo._statistics(model, layers, ctx)  # no UNet call (to_v on the text embedding)
    latents = nemo._latents(model)
    t = model.timesteps(nemo.params.num_inference_steps)[nemo.params.timestep_index]

    log = {"selection": [], "refine": [], "refine_input": None}
    orig_selection, orig_refine = N.initial_selection, N.refine

    def selection_spy(activations, means, stds, score, *a, **kw):
        def counted(sets):
            log["selection"].append(_key(sets))
            return score(sets)
        return orig_selection(activations, means, stds, counted, *a, **kw)

    def refine_spy(sets, score, *a, **kw):
        log["refine_input"] = [list(s) for s in sets]

        def counted(sets):
            v = score(sets)
            log["refine"].append((_key(sets), N._score_value(v)))
            return v
        return orig_refine(sets, counted, *a, **kw)

    monkeypatch.setattr(N, "initial_selection", selection_spy)
    monkeypatch.setattr(N, "refine", refine_spy)

    calls = {"unet_output": 0, "hook": 0}
    orig_output = model.unet_output

    def unet_output(*a, **kw):
        calls["unet_output"] += 1
        return orig_output(*a, **kw)

    def pre_hook(module, args, kwargs):
        calls["hook"] += 1

    model.unet_output = unet_output  # an instance attribute shadows the method; deleted again below
    handle = model.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        rec = nemo.localize(model, TEXT, layers, means, stds, latents, t)
    finally:
        handle.remove()
        del model.unet_output
        monkeypatch.undo()
    return nemo, rec, calls, log, (layers, means, stds)


def test_nemo_memorized_prompt_unet_calls_within_reference(model, ctx, monkeypatch):
    _, rec, calls, log, (layers, means, stds) = _localize_counted(model, ctx, monkeypatch, MEMORIZED)
    assert rec["memorized"] and rec["seeds_K"] == [0, 1, 2]
    n = calls["unet_output"]
    assert calls["hook"] == n  # no UNet call bypasses DiffusionModel.unet_output

    # the record, cross-checked against the spied algorithm
    assert rec["n_candidates"] == len(log["selection"]) == 3  # several rounds of the initial selection
    assert rec["initial_score"] > MEMORIZED["initial_threshold"]  # ... none met τ_init: fallback τ_ref
    raw = log["refine_input"]  # the initial set as a list with duplicates (the record stores it deduplicated)
    acts = [a[0] for a in N.embedding_activations(layers, model.encode_prompt(TEXT))]
    assert raw == N.candidate_sets(acts, means, stds, rec["theta"], rec["k"])
    assert [list(dict.fromkeys(s)) for s in raw] == rec["initial"]

    # the reference's count R (module docstring), derived from the record and refine's structure
    layer_tests = [l for l in reversed(range(len(rec["initial"]))) if rec["initial"][l]]
    layer_values = [v for _, v in log["refine"][: len(layer_tests)]]
    dropped = {l for l, v in zip(layer_tests, layer_values) if v < rec["tau_ref"]}
    neuron_tests = sum(len(raw[l]) for l in range(len(raw)) if l not in dropped)
    assert len(log["refine"]) == len(layer_tests) + neuron_tests  # refine made exactly these tests
    reference = 1 + rec["n_candidates"] + len(layer_tests) + neuron_tests + 1
    # the case exercises all of refinement: layers dropped whole, neurons tested, some neurons dropped
    assert dropped and neuron_tests > 0
    assert sum(map(len, rec["refined"])) < sum(len(raw[l]) for l in range(len(raw)) if l not in dropped)

    # memobench: one unblocked call plus one per distinct blocked set (the memo), never more than the reference
    distinct = {k for k in log["selection"]} | {k for k, _ in log["refine"]} | {_key(rec["refined"])}
    assert rec["n_evaluations"] == len(distinct)
    assert n == 1 + rec["n_evaluations"]
    assert n <= reference
    assert n < reference  # here the memo saves calls (the final refined score is always a set already scored)


def test_nemo_not_memorized_prompt_one_unet_call(model, ctx, monkeypatch):
    nemo, rec, calls, log, _ = _localize_counted(model, ctx, monkeypatch, NOT_MEMORIZED)
    assert rec["memorized"] is False and rec["seeds_K"] == []
    assert max(rec["pairwise_max"]) <= nemo.params.pairwise_threshold
    assert calls == {"unet_output": 1, "hook": 1}  # the seed filter's unblocked δ only
    assert rec["n_evaluations"] == 0 and not log["selection"] and log["refine_input"] is None
