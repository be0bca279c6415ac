"""The plan phase on its own (memobench.pipeline.plan): jobs, sample keys, shards, the dry-run plan."""

from __future__ import annotations

import pytest
from pipeline_fakes import EditMitigation, IdentityAttack, NoMitigation, RealAttack, make, prompts

from memobench.config import BadInput
from memobench.distributed import Shard
from memobench.pipeline import plan as P

MODEL = {"name": "fake-model", "weights": "0" * 64}
GEN = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": 32, "width": 32}


def _key(p, s, mitigation, attack):
    return P.sample_key(MODEL, GEN, p, s, mitigation, attack)


def _jobs(mitigation, attack, n_prompts=3, seeds=(0, 1), utility=None, baseline=True):
    paired = not attack.is_identity
    with_baseline = P.baseline_needed(baseline, mitigation, attack)
    return P.build_jobs(prompts(n_prompts), list(seeds), utility or {}, [0], _key, mitigation, attack, paired,
                        with_baseline)


def test_sample_keys_ignore_the_no_op_mitigation_and_the_identity_attack():
    p = prompts(1)[0]
    plain = _key(p, 0, None, None)
    assert _key(p, 0, make(NoMitigation), make(IdentityAttack)) == plain
    assert _key(p, 0, make(EditMitigation), None) != plain
    assert _key(p, 0, None, make(RealAttack)) != plain
    assert _key(p, 1, None, None) != plain
    assert P.sample_key(MODEL, {**GEN, "height": 64}, p, 0, None, None) != plain


def test_jobs_in_fixed_role_order_with_pairing_baseline_and_utility():
    util = {"regular": prompts(2)}
    jobs = _jobs(make(EditMitigation), make(RealAttack), utility=util)
    roles = [j.role for j in jobs]
    assert roles == ["target"] * 6 + ["mitigated"] * 6 + ["baseline"] * 6 + ["regular"] * 2
    # the identity attack without a mitigation: no pairing, and the targets are the baseline
    jobs = _jobs(make(NoMitigation), make(IdentityAttack))
    assert {j.role for j in jobs} == {"target"} and len(jobs) == 6
    assert [(j.prompt.id, j.seed) for j in jobs[:3]] == [("p0", 0), ("p0", 1), ("p1", 0)]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_partition_the_jobs_by_unit(count):
    jobs = _jobs(make(EditMitigation), make(RealAttack), n_prompts=5, utility={"regular": prompts(4)})
    everything, all_units = P.plan_shard(jobs, Shard())
    assert everything == {j.key for j in jobs}
    parts = [P.plan_shard(jobs, Shard(index=i, count=count, array=(i, count))) for i in range(count)]
    keys = [k for part, _ in parts for k in part]
    assert len(keys) == len(set(keys)) and set(keys) == everything  # disjoint, complete
    for keys_i, units_i in parts:  # a unit (all seeds of one prompt in one role) is never split
        assert all((j.role, j.prompt.id) in units_i for j in jobs if j.key in keys_i and j.role == "target")
    assert set().union(*(u for _, u in parts)) == all_units


def test_dry_run_plan_counts_cached_and_owned():
    jobs = _jobs(make(NoMitigation), make(IdentityAttack))
    plan = P.Plan(prompts(3), 3, {}, jobs, False, cached={jobs[0].key, jobs[1].key})
    plan.owned, plan.owned_units = P.plan_shard(jobs, Shard())
    assert P.dry_run_plan(plan, Shard(), "h" * 64) == {"cached": 2, "remaining": 4, "jobs": 6,
                                                       "config_hash": "h" * 64}
    shard = Shard(index=0, count=2, array=(0, 2))
    plan.owned, plan.owned_units = P.plan_shard(jobs, shard)
    out = P.dry_run_plan(plan, shard, "h" * 64)
    assert out["shard"]["owned"] == len(plan.owned)
    assert out["shard"]["owned_cached"] + out["shard"]["owned_remaining"] == len(plan.owned)


def test_require_complete_names_the_missing_count_by_role():
    jobs = _jobs(make(EditMitigation), make(RealAttack), n_prompts=2, seeds=(0,))
    have = {j.key for j in jobs if j.role != "target"}
    with pytest.raises(BadInput) as e:
        P.require_complete(jobs, have.__contains__, None, "/cache", "aggregate")
    assert "aggregate: 2 of 6 samples are not in the cache /cache (target 2)" in str(e.value)
    # targets the attack skips for want of a reference image are not expected
    P.require_complete(jobs, have.__contains__, lambda p: True, "/cache", "aggregate")
