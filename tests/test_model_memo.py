"""`run --matrix` loads the model once: Runner._load_model reuses a memoised model only while its weights, hooks and
attention processors are exactly as loaded (memobench.runner.weights_fingerprint)."""

from __future__ import annotations

import torch

from memobench.config import RunConfig
from memobench.runner import Runner, weights_fingerprint


def _runner(tmp_path, memo):
    r = Runner(RunConfig(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out")), progress=False)
    r.model_memo = memo
    return r, r._context("cpu")


def test_matrix_reuses_the_loaded_model_while_it_is_unchanged(tmp_path):
    memo: dict = {}
    r1, ctx = _runner(tmp_path, memo)
    m1 = r1._load_model(ctx)
    fp = weights_fingerprint(m1)
    r2, ctx2 = _runner(tmp_path, memo)
    assert r2._load_model(ctx2) is m1  # reused

    h = m1.unet.conv_in.register_forward_hook(lambda mod, a, out: out)  # a hook left behind
    assert weights_fingerprint(m1) != fp
    r3, ctx3 = _runner(tmp_path, memo)
    m3 = r3._load_model(ctx3)
    assert m3 is not m1 and weights_fingerprint(m3) == fp  # loaded again, as the plugin loads it
    h.remove()

    with torch.no_grad():
        m3.unet.conv_in.weight[0, 0, 0, 0] += 1.0  # weights changed in place
    r4, ctx4 = _runner(tmp_path, memo)
    m4 = r4._load_model(ctx4)
    assert m4 is not m3 and weights_fingerprint(m4) == fp


def test_without_a_memo_every_runner_loads_its_own_model(tmp_path):
    r1, ctx = _runner(tmp_path, None)
    r2, ctx2 = _runner(tmp_path, None)
    assert r1._load_model(ctx) is not r2._load_model(ctx2)
