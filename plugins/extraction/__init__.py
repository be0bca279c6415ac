"""Generate-and-filter extraction: many seeds per prompt, a clique of near-identical generations flags a memorized
prompt, and the attacker publishes the generations of that clique (attack).

Paper: Carlini, Hayes, Nasr, Jagielski, Sehwag, Tramèr, Balle, Ippolito, Wallace, "Extracting Training Data from
Diffusion Models", USENIX Security 2023, arXiv 2301.13188, §4 ("Extracting data from Stable Diffusion": the
generate-and-filter attack, §4.1–4.2) and Definition 1 ((ℓ2, δ)-diffusion extraction). There is no official
repository; this module is written from the paper's text. Issue 29 item 1.

Registers the attack ``extraction`` (black-box: it sees the deployed system only through ``ctx.generate``, the
run's mitigation with its ``condition`` step and the run's sampler settings; ``needs_reference = False``). Per
target prompt p:

1. **Generate.** ``samples`` images x_1 … x_N of p from N seeds s_i = b + i (i = 0 … N−1), b = the first 31 bits of
   sha256("extraction" | sha256(p) | ``seed``) (CONVENTIONS §8: seeds derived from the prompt and a base seed; the
   paper says only "different random seeds"). A larger ``samples`` extends the same list, so the candidates of a
   smaller budget are a prefix of a larger one's (nested budget sweeps).
2. **Distance.** The paper's tiled ℓ2 (§4.2.1): each image, in [0, 1], is cut into ``tiles`` non-overlapping tiles
   on a √tiles × √tiles grid (the paper: 16 tiles of 128×128 px on 512-px images; here the tile size scales with
   the image: 16×16 px on the embedded model's 64-px images; sizes not divisible by the grid get tiles that differ
   by one pixel), and d(x, y) = max over tile positions k of ℓ2(x_k, y_k), ℓ2(a, b) = √(Σ_j (a_j − b_j)² / d) with
   d the number of values in the tile (Definition 1's normalised ℓ2). The maximum makes two generations close only
   when *every* tile is close, so a shared background alone does not join them (the paper's motivation).
   [CHOICE] tiles are compared at the same position (the paper: "the maximum of the ℓ2 distance between any pair
   of image tiles", read as corresponding tiles).
3. **Graph and clique.** An edge joins i ≠ j when d(x_i, x_j) ≤ ``threshold``. [PAPER] δ = 0.15, the threshold of
   the paper's (ℓ2, 0.15)-extraction (Definition 1, §4); [CHOICE] the same δ joins generations in the graph (no
   separate edge threshold was found for this module; a parameter). The largest clique is found exactly
   (:func:`largest_clique`: branch and bound with greedy-colouring bounds, Tomita & Seki's MCQ, on Python-int
   bitsets; ties between maximum cliques go to the one with the smallest sample indices, i.e. the smallest seeds). The prompt is
   **flagged** as memorized when the clique has ≥ ``min_clique`` members: [PAPER] 10 (of 500 generations).
4. **Publish.** The samples are ranked: members of the largest clique first, then the rest; within each group by
   degree in the graph (descending), then by seed (ascending). The attacker publishes its top-``len(ctx.seeds)``
   picks: the returned :class:`Conditioning` is the prompt's own (``encode_prompt(p)``, ``empty_embedding()``)
   with ``latents`` = the initial latents of the picked seeds (``model.initial_latents(picks, h, w)``, h × w the
   run's generation size), and the runner regenerates and scores exactly those images (MR, SSCD vs the training
   image, which the attack itself never sees). [CHOICE] the paper's attack stops at flagging (and then compares
   the clique's images with the training set); publishing the clique's generations is how a memobench attack
   turns that into the run's images. A prompt that is not flagged still publishes its best-ranked samples.

Budget: ``samples`` generated images per prompt (each one full generation of the deployed system). [PAPER] 500;
the default here is 25 ([CHOICE]: a default run of the embedded model, 8 prompts × 25 samples at 50 steps plus the
80 published images, took about 5 minutes of one CPU thread; 100 would take about 15); pass
``--attack-param samples=500`` for the paper's setting. ``budget_values`` (10, 25, 50, 100): 10 is the embedded
model's default number of seeds, where the attack publishes every sample it drew (no filtering).

The trace records per prompt: the largest clique's size, ``flagged``, the number of edges, the picked seeds (in
the run's seed order) with their degree and clique membership, the seed base b, ``samples``, ``threshold``,
``tiles`` and ``min_clique``; nothing per sample beyond the picks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from memobench.api import Attack, AttackOutput, BadInput, Conditioning, hookimpl, param


def seed_base(prompt_sha256: str, seed: int, tag: str = "extraction") -> int:
    """b: the first 31 bits of sha256(tag | prompt sha256 | seed); the sample seeds are b, b + 1, …"""
    h = hashlib.sha256(f"{tag}|{prompt_sha256}|{int(seed)}".encode()).digest()
    return int.from_bytes(h[:4], "big") >> 1


def _bounds(n: int, k: int) -> list[int]:
    """Boundaries of k near-equal consecutive slices of range(n) (all equal when k divides n)."""
    return [(i * n) // k for i in range(k + 1)]


def tiled_l2(images, tiles: int):
    """N×N matrix of the paper's tiled ℓ2 between H×W×C uint8 ``images``: the maximum over the √tiles × √tiles tile
    positions of √(mean squared difference) of the tiles in [0, 1] (float64; zero diagonal)."""
    import numpy as np

    x = np.stack([np.asarray(im) for im in images])
    n, h, w = x.shape[:3]
    g = math.isqrt(tiles)
    rows, cols = _bounds(h, g), _bounds(w, g)
    dist = np.zeros((n, n))
    for r in range(g):
        for c in range(g):
            t = x[:, rows[r]:rows[r + 1], cols[c]:cols[c + 1]].reshape(n, -1).astype(np.float64) / 255.0
            sq = (t * t).sum(1)
            d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (t @ t.T), 0.0) / t.shape[1]
            np.maximum(dist, np.sqrt(d2), out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def largest_clique(adj) -> list[int]:
    """An exact maximum clique of the undirected graph with boolean adjacency matrix ``adj`` (diagonal ignored),
    as sorted vertex indices; among maximum cliques, the lexicographically smallest. Branch and bound with greedy
    colouring bounds (Tomita & Seki's MCQ) on Python-int bitsets; branches that cannot reach the best size found are
    cut, branches that can tie it are not (so every maximum clique is seen and the tie-break is exact)."""
    import sys

    import numpy as np

    n = len(adj)
    nbr = [sum(1 << int(j) for j in np.flatnonzero(adj[i]) if j != i) for i in range(n)]
    best: list[list[int]] = [[]]

    def colouring(p: int) -> tuple[list[int], list[int]]:
        """The vertices of ``p`` in greedy colouring order and each one's colour number: a clique among the first
        k vertices has at most colour[k − 1] members."""
        order, colour, k = [], [], 0
        while p:
            k += 1
            q = p
            while q:
                v = (q & -q).bit_length() - 1
                q &= ~nbr[v] & ~(1 << v)
                p &= ~(1 << v)
                order.append(v)
                colour.append(k)
        return order, colour

    def expand(r: list[int], p: int) -> None:
        order, colour = colouring(p)
        for v, c in zip(reversed(order), reversed(colour)):
            if len(r) + c < len(best[0]):
                return
            q = p & nbr[v]
            if q:
                expand(r + [v], q)
            else:
                cand = sorted(r + [v])
                if len(cand) > len(best[0]) or (len(cand) == len(best[0]) and cand < best[0]):
                    best[0] = cand
            p &= ~(1 << v)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, n + 1000))  # one level per clique member
    try:
        expand([], (1 << n) - 1)
    finally:
        sys.setrecursionlimit(limit)
    return best[0]


def rank_samples(adj, clique: list[int], seeds: list[int]) -> list[int]:
    """Sample indices, best first: clique members, then the rest; each by degree (descending), then seed."""
    import numpy as np

    a = np.asarray(adj, dtype=bool).copy()
    np.fill_diagonal(a, False)
    degree = a.sum(1)
    inside = set(clique)
    return sorted(range(len(seeds)), key=lambda i: (i not in inside, -int(degree[i]), seeds[i]))


class Extraction(Attack):
    """Carlini et al. (USENIX Security 2023) generate-and-filter: publish the largest clique of alike samples."""

    name = "extraction"
    version = "1"
    needs_reference = False
    depends_on_sampler = True  # it samples the deployed system and publishes one latent per seed of the run
    budget_param = "samples"
    budget_unit = "generated samples per prompt"
    budget_values = (10, 25, 50, 100)

    @dataclass
    class Params:
        samples: int = param(25, "generations per prompt, one seed each; the paper draws 500 [PAPER], 25 keeps "
                                 "the embedded model's run within minutes on one CPU thread [CHOICE]")
        threshold: float = param(0.15, "tiled ℓ2 distance (images in [0, 1]) at or below which two generations are "
                                       "joined; δ = 0.15 of the paper's (ℓ2, 0.15)-extraction [PAPER]")
        tiles: int = param(16, "tiles per image, a square number (a √tiles × √tiles grid whose tile size scales "
                               "with the image); 16 tiles of 128×128 on 512 px [PAPER]")
        min_clique: int = param(10, "largest-clique size at which the prompt is flagged memorized; 10 of 500 "
                                    "[PAPER]")
        seed: int = param(0, "with the prompt's sha256, sets the sample seeds b, b + 1, … (CONVENTIONS §8)")

        def __post_init__(self):
            what = "attack 'extraction' parameter"
            for k in ("samples", "min_clique"):
                if getattr(self, k) < 1:
                    raise BadInput(f"{what} {k}={getattr(self, k)}: must be ≥ 1")
            if not self.threshold > 0:
                raise BadInput(f"{what} threshold={self.threshold}: must be > 0")
            if self.tiles < 1 or math.isqrt(self.tiles) ** 2 != self.tiles:
                raise BadInput(f"{what} tiles={self.tiles}: must be a square number (1, 4, 16, 64, …)")

    def sample_seeds(self, prompt) -> list[int]:
        b = seed_base(prompt.sha256, self.params.seed)
        return [b + i for i in range(self.params.samples)]

    def sample(self, prompt, seeds: list[int], ctx) -> list:
        """The deployed system's images of ``prompt`` for ``seeds``, in chunks of the run's batch size."""
        bs = ctx.batch_size or 8
        images: list = []
        with ctx.task(f"extraction {prompt.id}: sample", len(seeds), transient=True) as advance:
            for i in range(0, len(seeds), bs):
                chunk = seeds[i: i + bs]
                images.extend(ctx.generate(prompt, chunk))
                advance(len(chunk))
        return images

    def run(self, model, prompt, reference, ctx) -> AttackOutput:
        import numpy as np

        from memobench.api import generation_size

        p = self.params
        k = len(ctx.seeds)
        height, width = generation_size(model, ctx)
        if p.samples < k:
            raise BadInput(f"attack 'extraction' parameter samples={p.samples}: must be ≥ the run's number of seeds "
                           f"({k}), the number of samples the attacker publishes")
        if math.isqrt(p.tiles) > min(height, width):
            raise BadInput(f"attack 'extraction' parameter tiles={p.tiles}: more tile rows than the {height}×{width} "
                           f"images have pixels; use at most {min(height, width) ** 2}")
        seeds = self.sample_seeds(prompt)
        images = self.sample(prompt, seeds, ctx)
        adj = tiled_l2(images, p.tiles) <= p.threshold
        np.fill_diagonal(adj, False)
        clique = largest_clique(adj)
        order = rank_samples(adj, clique, seeds)[:k]
        picks = [seeds[i] for i in order]
        cond = Conditioning(model.encode_prompt(prompt.text), model.empty_embedding(), text=prompt.text,
                            latents=model.initial_latents(picks, height, width))
        trace = {
            "largest_clique": len(clique), "flagged": len(clique) >= p.min_clique, "min_clique": p.min_clique,
            "edges": int(adj.sum()) // 2, "samples": p.samples, "threshold": p.threshold, "tiles": p.tiles,
            "seed": p.seed, "seed_base": seeds[0], "sample_seeds": f"{seeds[0]} + i, i = 0..{p.samples - 1}",
            "picked_seeds": picks, "picked_degree": [int(adj[i].sum()) for i in order],
            "picked_in_clique": [i in set(clique) for i in order],
        }
        return AttackOutput(cond, trace=trace)


@hookimpl
def register_attacks(register):
    register(Extraction)
