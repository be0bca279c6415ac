"""Carlini et al. generate-and-filter (``extraction``): the tiled ℓ2 distance and the largest clique against values
computed here independently (explicit tile loops, brute force over vertex subsets, networkx), the ranking of the
published picks, parameter checks, ``memobench ls``, and end-to-end runs on the embedded model whose picks are
recomputed here from the deployed system's images."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from memobench.api import BadInput, Prompt
from memobench.config import RunConfig
from memobench.runner import Runner
from memobench_plugins.extraction import Extraction, largest_clique, rank_samples, seed_base, tiled_l2


def _tiled_by_hand(a, b, grid):
    """max over the grid's tiles of √(mean (a − b)²) in [0, 1], with explicit tile loops."""
    h, w = a.shape[:2]
    worst = 0.0
    for r in range(grid):
        for c in range(grid):
            r0, r1 = r * h // grid, (r + 1) * h // grid
            c0, c1 = c * w // grid, (c + 1) * w // grid
            ta = a[r0:r1, c0:c1].astype(float) / 255
            tb = b[r0:r1, c0:c1].astype(float) / 255
            worst = max(worst, float(np.sqrt(np.mean((ta - tb) ** 2))))
    return worst


@pytest.mark.parametrize("size,tiles", [((8, 8), 4), ((10, 6), 4), ((12, 12), 9), ((8, 8), 1)])
def test_tiled_l2_by_hand(size, tiles):
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(4)]
    d = tiled_l2(ims, tiles)
    g = math.isqrt(tiles)
    for i, j in itertools.product(range(4), repeat=2):
        assert d[i, j] == pytest.approx(_tiled_by_hand(ims[i], ims[j], g), abs=1e-9)
    assert np.allclose(d, d.T) and (np.diag(d) == 0).all()


def test_tiled_l2_is_the_worst_tile():
    """Two 8×8 images equal except one 4×4 tile that differs by 51 levels (0.2): the 4-tile distance is 0.2 (the
    whole-image ℓ2 would be 0.1), so a shared background does not make two generations close."""
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[4:, :4] += 51
    d = tiled_l2([a, b], 4)
    assert d[0, 1] == pytest.approx(0.2)
    assert tiled_l2([a, b], 1)[0, 1] == pytest.approx(0.1)


def _brute_force_clique(adj):
    n = len(adj)
    for k in range(n, 0, -1):
        for c in itertools.combinations(range(n), k):  # lexicographic order: the first found is the smallest
            if all(adj[i][j] for i, j in itertools.combinations(c, 2)):
                return list(c)
    return []


def _random_graph(rng, n, p):
    a = rng.random((n, n)) < p
    a = np.triu(a, 1)
    return a | a.T


@pytest.mark.parametrize("n,p", [(1, 0.5), (6, 0.0), (8, 0.5), (10, 0.7), (10, 1.0), (9, 0.3)])
def test_largest_clique_matches_brute_force(n, p):
    rng = np.random.default_rng(n * 100 + int(p * 10))
    for _ in range(5):
        adj = _random_graph(rng, n, p)
        assert largest_clique(adj) == _brute_force_clique(adj)


def test_largest_clique_matches_networkx():
    nx = pytest.importorskip("networkx")
    rng = np.random.default_rng(7)
    for n, p in [(40, 0.3), (60, 0.5), (30, 0.8), (80, 0.6)]:
        adj = _random_graph(rng, n, p)
        cliques = [sorted(int(v) for v in c) for c in nx.find_cliques(nx.from_numpy_array(adj.astype(int)))]
        size = max(len(c) for c in cliques)
        assert largest_clique(adj) == min(c for c in cliques if len(c) == size)  # every maximum clique is maximal


def test_rank_samples_by_hand():
    """Clique {1, 2, 3}; degrees 0:1, 1:2, 2:3, 3:2, 4:1, 5:1 (edges 0-2, 1-2, 2-3, 1-3, 4-5)."""
    adj = np.zeros((6, 6), bool)
    for i, j in [(0, 2), (1, 2), (2, 3), (1, 3), (4, 5)]:
        adj[i, j] = adj[j, i] = True
    seeds = [50, 40, 30, 20, 10, 60]
    clique = largest_clique(adj)
    assert clique == [1, 2, 3]
    # clique: 2 (degree 3), then 3 and 1 (degree 2, seeds 20 < 40); rest: degree 1 each, by seed 10, 50, 60
    assert rank_samples(adj, clique, seeds) == [2, 3, 1, 4, 0, 5]


class _StubModel:
    """What ``run`` needs of a model, with initial latents that name their seed."""

    def encode_prompt(self, text):
        import torch

        return torch.ones(1, 77, 8)

    def empty_embedding(self):
        import torch

        return torch.zeros(1, 77, 8)

    def initial_latents(self, seeds, height, width):
        import torch

        return torch.tensor(seeds, dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, 4, height // 8, width // 8)


def test_run_publishes_the_clique(tmp_path):
    """12 samples: indices 3, 5, 8, 9 are the same picture up to ±2 levels (a clique of 4, flagged at
    min_clique=4), 0 and 1 a near-pair, the rest random; the 3 published seeds are the clique's best 3."""
    prompt = Prompt("p", "a memorized caption")
    attack = Extraction(Extraction.make_params({"samples": 12, "min_clique": 4}))
    seeds = attack.sample_seeds(prompt)
    assert seeds == [seed_base(prompt.sha256, 0) + i for i in range(12)]
    rng = np.random.default_rng(1)
    base = rng.integers(10, 240, (32, 32, 3))
    images = [rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) for _ in range(12)]
    for i in (3, 5, 8, 9):
        images[i] = (base + rng.integers(-2, 3, base.shape)).astype(np.uint8)
    images[1] = np.clip(images[0].astype(int) + 3, 0, 255).astype(np.uint8)
    calls = []

    def generate(p, s):
        calls.append(list(s))
        return [images[seeds.index(x)] for x in s]

    ctx = SimpleNamespace(seeds=(0, 1, 2), generation={"height": 32, "width": 32}, batch_size=5, generate=generate,
                          task=lambda *a, **k: __import__("contextlib").nullcontext(lambda n=1: None))
    out = attack.run(_StubModel(), prompt, None, ctx)
    assert calls == [seeds[0:5], seeds[5:10], seeds[10:12]]  # the run's batch size
    tr = out.trace
    assert tr["largest_clique"] == 4 and tr["flagged"] and tr["edges"] == 6 + 1
    assert tr["picked_seeds"] == [seeds[3], seeds[5], seeds[8]]  # all of degree 3: by seed
    assert tr["picked_in_clique"] == [True] * 3 and tr["picked_degree"] == [3, 3, 3]
    lat = out.conditioning.latents
    assert lat.shape == (3, 4, 4, 4) and lat[:, 0, 0, 0].long().tolist() == tr["picked_seeds"]
    assert not Extraction(Extraction.make_params({"samples": 12, "min_clique": 5})).run(
        _StubModel(), prompt, None, ctx).trace["flagged"]


@pytest.mark.parametrize("kv,msg", [({"samples": 0}, "samples"), ({"tiles": 15}, "tiles"),
                                    ({"threshold": 0.0}, "threshold"), ({"min_clique": 0}, "min_clique"),
                                    ({"tiles": "many"}, "tiles")])
def test_bad_parameters(kv, msg):
    with pytest.raises(BadInput, match=f"extraction' parameter {msg}"):
        Extraction.make_params(kv)


def test_ls_lists_extraction_with_descriptions(cli_inproc, monkeypatch):
    from dataclasses import fields

    from memobench.api import param_help

    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "attacks"])
    assert rc == 0, err
    text = " ".join(out.split())
    assert "extraction" in text
    for f in fields(Extraction.Params):
        help_ = param_help(Extraction, f.name)
        assert help_ and f"{f.name}={f.default!r} — {' '.join(help_.split())}" in text, f.name


def _run(tmp_path, steps=2, seeds=(0, 1), **params):
    cfg = RunConfig(model="tiny", limit=1, seeds=list(seeds), num_inference_steps=steps, metrics=["mr"],
                    cache_dir=str(tmp_path / "c"), offline=True, output_dir=str(tmp_path / "out"),
                    attack="extraction", attack_params={k: str(v) for k, v in params.items()})
    return Runner(cfg, progress=False).run()


def test_end_to_end_on_the_embedded_model(tmp_path):
    """samples=5 on the first tiny-vm prompt (2 steps): the trace's picks are recomputed here from the images of the
    sample seeds (the deployed system: no mitigation, the run's sampler), and the run pairs the attack with the
    mitigation alone."""
    import torch

    from memobench.api import Context
    from memobench.registry import get_registry

    out = _run(tmp_path, samples=5, threshold=0.3, min_clique=2)
    res = out.result
    (pid, tr), = res["attack_traces"].items()
    assert "mr" in res["metrics"] and "mr" in res["metrics_without_attack"]
    assert Extraction(Extraction.make_params({"samples": 5})).budget() == 5.0
    reg = get_registry()
    prompt = next(p for p in reg.get("prompt_set", "tiny-vm")().prompts(None) if p.id == pid)
    model = reg.get("model", "tiny")().load(Context(cache_dir=tmp_path / "c"))
    seeds = [seed_base(prompt.sha256, 0) + i for i in range(5)]
    torch.set_num_threads(1)
    images = model.generate(model.encode_prompt(prompt.text), model.empty_embedding(), seeds, 2, 3.0, 64, 64)
    adj = tiled_l2(list(images), 16) <= 0.3
    np.fill_diagonal(adj, False)
    clique = largest_clique(adj)
    picks = [seeds[i] for i in rank_samples(adj, clique, seeds)[:2]]
    assert tr["picked_seeds"] == picks and tr["largest_clique"] == len(clique)
    assert tr["flagged"] == (len(clique) >= 2) and tr["samples"] == 5 and tr["threshold"] == 0.3


def test_sampler_settings_enter_the_attack_key(tmp_path):
    """The output depends on the run's sampler and number of seeds: another step count or seed count in the same
    cache attacks anew instead of reusing latents of the wrong count."""
    a = _run(tmp_path, samples=3)
    b = _run(tmp_path, samples=3, steps=3)
    c = _run(tmp_path, samples=3, seeds=(0, 1, 2))
    keys = {next(iter(r.result["attack_traces"].values()))["attack_key"] for r in (a, b, c)}
    assert len(keys) == 3
    assert len(next(iter(c.result["attack_traces"].values()))["picked_seeds"]) == 3


def test_fewer_samples_than_seeds_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="samples=1: must be ≥ the run's number of seeds"):
        _run(tmp_path, samples=1)

