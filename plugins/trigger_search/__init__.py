"""MemBench trigger-prompt search: MCMC (Gibbs) sampling of prompts in token space towards memorized images (attack).

Paper: Hong, Oh, Sung, "MemBench: Memorized Image Trigger Prompt Dataset for Diffusion Models", arXiv 2407.17095 /
TMLR 2025: Algorithm 1 (memorized image trigger prompt search; Algorithm 2, the augmentation, runs the same step
from a given sentence), as the reference README names them. Reference code ``chunsanHong/MemBench_code`` (f22a0fd), read with ``fetch``:
``run_MCMC.py`` (arguments, defaults, best-candidate rule), ``gen_utils.py`` (``get_SD_score`` = D_θ and the
Boltzmann weights, ``generate_caption_step`` = the proposal set, ``MCMC_generation`` / ``MCMC_aug`` = the chain),
``utils.py`` (``get_init_text``), ``stop_words.txt`` and ``banned_tokens.pickle`` (the vocabulary filters).
memobench ``METHODS.md`` §2.5 describes the prompt set MemBench built with it.

**The method (reference code).** A prompt p is a sentence of ``length`` word slots (``--sentence_len`` 8). Its
memorization score is Wen et al.'s text-conditional noise magnitude at the first, noisiest step, as a sum of squares::

    D_θ(p) = (1/n) Σ_j ‖ ε_θ(x_T^j, T, e_p) − ε_θ(x_T^j, T, e_∅) ‖²,   x_T^j ~ N(0, I),  T = 999      (get_SD_score)

(squared L2 summed over the C×h×w latent elements, mean over ``n`` = ``--approx_num`` = 1 latents; t = 999 is
passed literally, not the first DDIM timestep 981). The chain
samples the Boltzmann distribution π(p) ∝ exp(D_θ(p)/τ), τ = ``--SD_temperature`` = 0.1, by Gibbs steps: each
iteration picks a slot k uniformly, asks a masked language model (BERT) for the ``--candidate_k`` = 200 most
likely words at k (LM temperature 0.1, punctuation/number/special tokens of ``stop_words.txt`` and the 323 words of
``banned_tokens.pickle`` excluded), always adds the slot's current word and the empty word ([MASK], decoded as
nothing) to that set, scores every candidate sentence with D_θ on one fresh x_T shared by all of them (one
unconditional and 200 conditional UNet passes), and draws the new word from softmax(D_θ/τ) over the candidates
(``torch.multinomial``): an exact heat-bath (Gibbs) step of π restricted to the proposal set, so there is no
separate accept/reject test. After ``--num_iterations`` (README: 150) the prompt with the **largest D_θ among all
candidates ever scored** is the trigger (``run_MCMC.run_caption`` sorts every (text, D_θ) pair), which the authors
then sample 50 times and cluster with SSCD to confirm memorization.

**memobench's attack** (``run(model, prompt, reference, ctx)``), per target, with the differences marked:

1. Start from an unrelated prompt, never the target's text: ``init_prompt``, or (empty, default) one of the model's
   non-memorized prompts ``ctx.nonmem_prompts`` drawn with the attack generator. Its words fill the first slots,
   the rest are empty ([CHOICE]: MemBench's Algorithm 1 starts from an all-empty sentence behind the BERT context
   "Image of a", Algorithm 2 from a given sentence; the issue asks for a start from unrelated prompts). The target
   prompt's text is never read; only its sha256 seeds the generator.
2. [CHOICE] Target the given training image. MemBench's search is untargeted (any memorized image); the energy
   adds DoRI's diffusion loss on the reference latent z = ``model.encode_image(reference)`` (posterior mean, at
   the run's generation size), in the same units as D_θ (squared ε-error summed over the latent)::

       L(p) = (1/m) Σ_i ‖ ε_i − ε_θ(√ᾱ_{t_i} z + √(1−ᾱ_{t_i}) ε_i, t_i, e_p) ‖²,   t_i ~ U{0..T−1}, ε_i ~ N(0, I)
       E(p) = −D_θ(p) + λ·L(p),   π(p) ∝ exp(−E(p)/τ)

   with λ = ``target_weight`` (1; 0 switches the target off: MemBench's own D_θ-only chain, which needs no
   reference) and m = ``ref_draws`` pairs (t_i, ε_i) shared by all candidates of a proposal. ε for v-prediction
   models (the embedded ``tiny``) is converted from v (``model.eps``).
3. [CHOICE] The proposal set. No language model can be loaded offline, so besides the current and the empty word
   (one word when the slot is empty) the ``candidates`` set is filled with words drawn uniformly without
   replacement from a word ``pool``: ``"vocab"`` = the tokenizer's alphabetic whole-word tokens that tokenize back
   to themselves (32,875 of SD's 49,408 CLIP BPE tokens), optionally only the ``pool_size`` most frequent (lowest
   BPE merge rank); ``"nonmem"`` = the words of ``ctx.nonmem_prompts``. MemBench's filters map onto this: its
   stop-word list is punctuation, numbers and special tokens (alphabetic words only here); its banned list
   (landscape/logo words that raise D_θ on SD-1.4 without memorization) is SD-1.4-specific and unlicensed, so
   ``banned`` (comma-separated words) is empty by default. Every candidate sentence is the slots' words joined by
   spaces, encoded as ``model.encode_prompt`` encodes it (MemBench likewise decodes BERT tokens to text and lets
   the pipeline tokenize it).
4. Budget: ``proposals`` Gibbs steps (MemBench ``--num_iterations``: README 150, argparse default 10). One proposal
   costs n·(1 + K) + K·m UNet evaluations (one latent image through the UNet each; K = ``candidates``, n =
   ``latents_per_prompt``, m = ``ref_draws``, the K·m term only when λ > 0): 33 at the defaults (n = 1, K = 16,
   m = 1), 201 for MemBench's untargeted chain with K = 200; plus K text-encoder passes. [CHOICE] K = 16 and 30
   proposals keep a default run of the embedded model on one CPU thread under 6 minutes (``memobench run
   --attack trigger_search``, 8 targets × 10 seeds, mitigation none: 279 s of CPU time, attack and both
   generations together); the reference code's settings are the preset ``membench``
   (:meth:`TriggerSearchAttack.preset`: 150 proposals, K = 200, λ = 0, ``resample``).
5. ``resample``: MemBench draws a new x_T every iteration [CODE] (``resample = True``, which also draws new
   (t_i, ε_i)). [CHOICE] default False: the draws of the first proposal serve the whole chain (common random
   numbers), so E is a fixed function of the text and the "best of every scored candidate" rule compares like
   with like; with fresh draws the target term, whose size varies by orders of magnitude with t_i, would pick the
   proposal with the luckiest timestep rather than the best text. On the embedded model (``memobench run
   --mitigation none --attack trigger_search --metric mr --metric sscd_orig``, 8 VM targets × 10 seeds) fixed
   draws give MR 0.625 (SSCD_orig 0.667), ``--attack-param resample=true`` MR 0.250 (SSCD_orig 0.589).
6. Output ``"best"`` ([CODE]): the candidate with the lowest E among all candidates scored; ``"last"``: the chain's
   final state. The conditioning is ``model.encode_prompt(text)`` with e_∅ as negative embedding, ``text`` set.
   ``proposals = 0`` returns the initial prompt (the 0-budget point of an MR-vs-budget curve).

The trace records the trigger text and its token ids, the initial prompt, per proposal the chain's energy E (and
its D_θ and L parts), slot, chosen word and text, the acceptance rate (fraction of proposals whose draw changed the
slot's word: the Gibbs analogue of a Metropolis acceptance rate), the best energy, the UNet evaluations spent and
the generator seed.

Randomness: one CPU ``torch.Generator`` per target, seeded from sha256("trigger_search" | prompt sha256 | ``seed``)
and recorded as ``generator_seed``. It draws, in this order: the initial prompt's index (only when ``init_prompt``
is empty); then per proposal the slot (``randint``), a permutation of the pool (``randperm``; its first words other
than the current one fill the candidate set), the noise (every proposal when ``resample``, else at the first one
only: x_T ``randn``, t ``randint``, ε ``randn``), and the Gibbs draw (``multinomial``). Draws are made on the CPU, so they do not depend on the device.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

from memobench.api import Attack, AttackOutput, BadInput, Conditioning, hookimpl, param

POOLS = ("vocab", "nonmem")
OUTPUTS = ("best", "last")


def generator_seed(prompt_sha256: str, seed: int) -> int:
    """The attack generator's seed: the first 63 bits of sha256("trigger_search" | prompt sha256 | seed)."""
    h = hashlib.sha256(f"trigger_search|{prompt_sha256}|{int(seed)}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


_VOCAB_WORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its vocab_words


def vocab_words(tokenizer) -> list[str]:
    """The tokenizer's alphabetic ASCII whole-word tokens (``word</w>``) that tokenize back to exactly that one token,
    in token-id order (for CLIP's BPE: merge rank, i.e. most frequent first). Computed once per tokenizer object."""
    if tokenizer not in _VOCAB_WORDS:
        _VOCAB_WORDS[tokenizer] = _vocab_words(tokenizer)
    return list(_VOCAB_WORDS[tokenizer])


def _vocab_words(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    cands = sorted((i, t[:-4]) for t, i in vocab.items()
                   if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii())
    ids = tokenizer([w for _, w in cands], add_special_tokens=False).input_ids
    return [w for (i, w), got in zip(cands, ids) if list(got) == [i]]


def text_of(slots: list[str]) -> str:
    """The sentence of a chain state: its non-empty words joined by single spaces."""
    return " ".join(w for w in slots if w)


@dataclass
class Draws:
    """The noise of one proposal: ``x_T`` (n×C×h×w) for D_θ, timesteps ``t`` (m,) and noises ``eps`` (m×C×h×w)."""

    x_T: object
    t: object
    eps: object


def energies(model, texts: list[str], draws: Draws, z, t_detect: int, target_weight: float, chunk: int = 32):
    """``(E, D, L)``, each a K-vector (fp32, CPU): E = −D_θ + λ·L for the K candidate ``texts`` (step 2 of the module
    docstring). ``z`` is the reference latent (1×C×h×w) or None when λ = 0 (then L is zeros)."""
    import torch

    emb = model.encode_prompt(texts)
    K, dt, dev = len(texts), model.dtype, model.device
    D = torch.zeros(K)
    with torch.no_grad():
        for x in draws.x_T:
            x = x[None].to(dev, dt)
            u = model.eps(x, t_detect, model.empty_embedding()).float()
            for a in range(0, K, chunk):
                e = emb[a:a + chunk]
                c = model.eps(x.expand(len(e), -1, -1, -1), t_detect, e).float()
                D[a:a + len(e)] += (c - u).pow(2).sum((1, 2, 3)).cpu()
        D /= len(draws.x_T)
        L = torch.zeros(K)
        if target_weight != 0 and z is not None:
            for t, eps in zip(draws.t, draws.eps):
                eps = eps[None].to(dev, torch.float32)
                x = model.add_noise(z, eps, t.to(dev)).to(dt)
                for a in range(0, K, chunk):
                    e = emb[a:a + chunk]
                    pred = model.eps(x.expand(len(e), -1, -1, -1), t.to(dev), e).float()
                    L[a:a + len(e)] += (eps - pred).pow(2).sum((1, 2, 3)).cpu()
            L /= len(draws.t)
    return -D + target_weight * L, D, L


def gibbs_choice(E, temperature: float, gen) -> int:
    """Index of the candidate drawn from softmax(−E/τ) (MemBench: softmax(D_θ/τ), ``torch.multinomial``)."""
    import torch

    probs = torch.softmax(-E.double() / temperature, dim=0)
    return int(torch.multinomial(probs, 1, generator=gen))


class TriggerSearchAttack(Attack):
    """MemBench (Hong et al., TMLR 2025): Gibbs search over prompts for memorized-image triggers, from an unrelated
    prompt, aimed at the target's training image."""

    name = "trigger_search"
    version = "1"
    needs_reference = True
    budget_param = "proposals"
    budget_unit = ("MCMC proposals (each: latents_per_prompt·(1 + candidates) + candidates·ref_draws UNet "
                   "evaluations = 33 at the defaults; 201 at MemBench's 200 candidates without the target term)")
    budget_values = (0, 5, 10, 30, 100)

    @dataclass
    class Params:
        proposals: int = param(30, "Gibbs steps (MemBench --num_iterations: README 150, preset 'membench') [CHOICE]")
        candidates: int = param(16, "candidate words per step incl. the current and the empty word (MemBench "
                                "--candidate_k 200, preset 'membench') [CHOICE]")
        length: int = param(8, "word slots of a prompt (MemBench --sentence_len 8) [CODE]")
        temperature: float = param(0.1, "τ of π ∝ exp(−E/τ) (MemBench --SD_temperature 0.1) [CODE]")
        t_detect: int = param(-1, "timestep of D_θ; −1 = T−1 = 999 (MemBench get_SD_score) [CODE]")
        latents_per_prompt: int = param(1, "x_T draws averaged in D_θ (MemBench --approx_num 1) [CODE]")
        target_weight: float = param(1.0, "λ of the reference's diffusion loss in E; 0 = MemBench's untargeted "
                                     "D_θ-only chain (no reference used) [CHOICE]")
        ref_draws: int = param(1, "(t, ε) pairs of the reference loss per proposal [CHOICE]")
        resample: bool = param(False, "new noise every proposal (MemBench: a new x_T per iteration); False = the "
                               "draws of the first proposal for the whole chain [CHOICE]")
        pool: str = param("vocab", "'vocab' (alphabetic whole-word tokens of the tokenizer) | 'nonmem' (words of "
                          "the model's non-memorized prompts); stands in for BERT's top-k [CHOICE]")
        pool_size: int = param(0, "with pool='vocab': only the N most frequent words (lowest BPE rank); 0 = all")
        banned: str = param("", "comma-separated words never proposed (MemBench bans 323 SD-1.4 words) [CHOICE]")
        init_prompt: str = param("", "starting prompt; '' = one of ctx.nonmem_prompts, drawn with the seed")
        output: str = param("best", "'best' (lowest E of every scored candidate, MemBench) | 'last' (final state)")
        seed: int = param(0, "with the prompt's sha256, seeds the attack generator")

    @classmethod
    def preset(cls, name: str) -> TriggerSearchAttack.Params:
        """``membench``: the reference code's untargeted chain (README command: 150 iterations, 200 candidates, D_θ
        only, a new x_T every iteration)."""
        if name != "membench":
            raise BadInput(f"trigger_search: unknown preset {name!r}; available: membench")
        return cls.Params(proposals=150, candidates=200, target_weight=0.0, resample=True)

    def budget(self) -> float:
        return float(self.params.proposals)

    def unet_evaluations(self) -> int:
        """UNet evaluations (one latent image each) of one proposal at these parameters."""
        p = self.params
        return p.latents_per_prompt * (1 + p.candidates) + (p.candidates * p.ref_draws if p.target_weight else 0)

    def _check(self, model, reference) -> int:
        """Validate the parameters (BadInput, one line each); returns the timestep of D_θ."""
        p = self.params
        T = int(model.scheduler.config.num_train_timesteps)
        rules = [
            (p.proposals >= 0, "proposals must be ≥ 0"),
            (p.candidates >= 2, "candidates must be ≥ 2 (the current and at least one other word)"),
            (p.length >= 1, "length must be ≥ 1"),
            (p.temperature > 0, "temperature must be > 0"),
            (p.latents_per_prompt >= 1, "latents_per_prompt must be ≥ 1"),
            (p.ref_draws >= 1, "ref_draws must be ≥ 1"),
            (p.target_weight >= 0, "target_weight must be ≥ 0 (0 = untargeted)"),
            (p.pool in POOLS, f"pool must be one of {', '.join(POOLS)}, not {p.pool!r}"),
            (p.pool_size >= 0, "pool_size must be ≥ 0 (0 = the whole vocabulary)"),
            (p.output in OUTPUTS, f"output must be one of {', '.join(OUTPUTS)}, not {p.output!r}"),
            (p.t_detect == -1 or 0 <= p.t_detect < T, f"t_detect must be −1 or in 0..{T - 1}, not {p.t_detect}"),
        ]
        for ok, msg in rules:
            if not ok:
                raise BadInput(f"trigger_search: {msg}")
        if p.target_weight and reference is None:
            raise BadInput("trigger_search: the target has no reference (training) image; pass "
                           "--attack-param target_weight=0 for MemBench's untargeted search")
        return T - 1 if p.t_detect == -1 else p.t_detect

    def word_pool(self, model, ctx) -> list[str]:
        """The words proposals are drawn from (``pool``, ``pool_size``, ``banned``), in a fixed order."""
        p = self.params
        if p.pool == "vocab":
            words = vocab_words(model.tokenizer)
            words = words[:p.pool_size] if p.pool_size else words
        else:
            seen: dict[str, None] = {}
            for t in self._nonmem_texts(ctx, "pool='nonmem'"):
                seen.update((w, None) for w in t.lower().split() if w.isalpha())
            words = list(seen)
        banned = {w.strip().lower() for w in p.banned.split(",") if w.strip()}
        words = [w for w in words if w not in banned]
        if len(words) < self.params.candidates:
            raise BadInput(f"trigger_search: the word pool has {len(words)} words, fewer than candidates; "
                           "lower candidates or use pool=vocab")
        return words

    @staticmethod
    def _nonmem_texts(ctx, why: str) -> list[str]:
        raw = getattr(ctx, "nonmem_prompts", None) if ctx is not None else None
        if not raw:
            err = getattr(ctx, "nonmem_prompts_error", None) if ctx is not None else None
            raise BadInput(f"trigger_search: {why} needs the model's non-memorized prompts, which this run lacks"
                           f"{f' ({err})' if err else ''}; pass --attack-param init_prompt=<text> and pool=vocab")
        return [getattr(t, "text", t) for t in raw]

    def initial_slots(self, ctx, gen) -> tuple[str, list[str]]:
        """(initial prompt, its ``length`` word slots): its lower-cased words, then empty slots; longer prompts are
        cut to ``length`` words."""
        import torch

        p = self.params
        init = p.init_prompt
        if not init:
            texts = self._nonmem_texts(ctx, "init_prompt=''")
            init = texts[int(torch.randint(len(texts), (1,), generator=gen))]
        words = init.lower().split()[:p.length]
        return init, words + [""] * (p.length - len(words))

    def draws(self, model, gen, shape, T: int) -> Draws:
        """The noise of one proposal (drawn on the CPU with ``gen``)."""
        import torch

        p = self.params
        x_T = torch.randn((p.latents_per_prompt, *shape), generator=gen) * float(model.scheduler.init_noise_sigma)
        t = torch.randint(0, T, (p.ref_draws,), generator=gen)
        eps = torch.randn((p.ref_draws, *shape), generator=gen)
        return Draws(x_T, t, eps)

    def propose(self, slots: list[str], pool: list[str], gen) -> tuple[int, list[str]]:
        """(slot k, its ``candidates`` candidate words): the current word, the empty word (once when the slot is
        empty), then pool words in the order of a random permutation, skipping the current one (MemBench: the
        current word + [MASK] + BERT's top-k)."""
        import torch

        k = int(torch.randint(len(slots), (1,), generator=gen))
        cur = slots[k]
        words = [cur] + ([""] if cur else [])
        for i in torch.randperm(len(pool), generator=gen).tolist():
            if len(words) >= self.params.candidates:
                break
            if pool[i] != cur:
                words.append(pool[i])
        return k, words

    def chain(self, model, slots, pool, z, gen, t_detect: int, ctx=None) -> dict:
        """Run ``proposals`` Gibbs steps from ``slots``; returns the trace's chain fields and the best candidate."""
        from memobench.api import generation_size

        p = self.params
        h, w = generation_size(model, ctx)
        shape = model.latent_shape(h, w)
        T = int(model.scheduler.config.num_train_timesteps)
        chunk = int(getattr(ctx, "batch_size", None) or 32)
        rec = {"energy_curve": [], "detect_curve": [], "target_curve": [], "positions": [], "words": [],
               "chain": [], "timesteps": []}
        best, moves, d = None, 0, None
        with _task(ctx, "trigger search", p.proposals) as advance:
            for _ in range(p.proposals):
                k, words = self.propose(slots, pool, gen)
                if d is None or p.resample:
                    d = self.draws(model, gen, shape, T)
                texts = [text_of(slots[:k] + [c] + slots[k + 1:]) for c in words]
                E, D, L = energies(model, texts, d, z, t_detect, p.target_weight, chunk)
                j = gibbs_choice(E, p.temperature, gen)
                moves += int(words[j] != slots[k])
                slots = slots[:k] + [words[j]] + slots[k + 1:]
                i = int(E.argmin())
                if best is None or float(E[i]) < best[1]:
                    best = (texts[i], float(E[i]), len(rec["chain"]))
                for key, v in (("energy_curve", float(E[j])), ("detect_curve", float(D[j])),
                               ("target_curve", float(L[j])), ("positions", k), ("words", words[j]),
                               ("chain", texts[j]), ("timesteps", [int(t) for t in d.t.tolist()])):
                    rec[key].append(v)
                advance(1)
        rec["acceptance_rate"] = moves / p.proposals if p.proposals else None
        rec["best"] = best
        return rec

    def run(self, model, prompt, reference, ctx) -> AttackOutput:
        import torch

        from memobench.api import generation_size

        p = self.params
        t_detect = self._check(model, reference)
        gseed = generator_seed(prompt.sha256, p.seed)
        gen = torch.Generator().manual_seed(gseed)
        init, slots = self.initial_slots(ctx, gen)
        pool = self.word_pool(model, ctx)
        z = None
        if p.target_weight:
            h, w = generation_size(model, ctx)
            z = model.encode_image(reference, height=h, width=w).to(model.device, torch.float32)
        rec = self.chain(model, slots, pool, z, gen, t_detect, ctx)
        best = rec.pop("best")
        if p.proposals == 0:
            text = text_of(slots)
        elif p.output == "best":
            text = best[0]
        else:
            text = rec["chain"][-1]
        ids = model.tokenizer(text, truncation=True, max_length=model.tokenizer.model_max_length).input_ids
        trace = {
            "trigger_text": text, "trigger_token_ids": [int(i) for i in ids], "init_prompt": init,
            "init_text": text_of(slots), **rec, "best_energy": best[1] if best else None,
            "best_proposal": best[2] if best else None, "proposals": p.proposals, "candidates": p.candidates,
            "pool": p.pool, "pool_words": len(pool), "temperature": p.temperature, "t_detect": t_detect,
            "target_weight": p.target_weight, "output": p.output, "seed": p.seed, "generator_seed": gseed,
            "generator": "torch.Generator (CPU), seeded from sha256(trigger_search | prompt sha256 | seed)",
            "unet_evaluations": self.unet_evaluations() * p.proposals,
        }
        emb = model.encode_prompt(text)
        return AttackOutput(Conditioning(emb, model.empty_embedding(), text=text), trace=trace)


def _task(ctx, description: str, total: int):
    import contextlib

    if ctx is None or not hasattr(ctx, "task"):
        return contextlib.nullcontext(lambda n=1, **kw: None)
    return ctx.task(description, total, transient=True)


@hookimpl
def register_attacks(register):
    register(TriggerSearchAttack)
