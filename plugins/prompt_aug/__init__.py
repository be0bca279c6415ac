"""Prompt-augmentation baselines: random token addition (RTA) and random number addition (RNA).

Papers: Somepalli, Singla, Goldblum, Geiping, Goldstein, "Understanding and Mitigating Copying in Diffusion
Models", NeurIPS 2023, §5 (inference-time caption randomisation: "random token addition", "random number
addition"); used as baselines by Wen et al. (ICLR 2024, §5) and MemBench (Hong et al., arXiv 2407.17095, §5, rows
"RTA" / "RNA"); NeMo (NeurIPS 2024) Table 1 reports "+1 / +4 / +10 random tokens". Reference code
``somepago/DCR`` ``sd_mitigation.prompt_augmentation`` and ``YuxinWenRick/diffusion_memorization``
``optim_utils.prompt_augmentation`` (``rand_word_add`` / ``rand_numb_add``); memobench ``METHODS.md`` §7.2 (last
paragraph), §7.6, §8.2.

Registers the mitigations ``rta`` and ``rna`` (``kind = "inference"``). For a prompt p, ``n_tokens`` times:

* ``rta``: draw a token id k uniformly from {0, …, 49399} (``vocab_high``, the reference's hard-coded 49400,
  which excludes the BOS/EOS ids), decode it with the model's tokenizer (``tokenizer.decode([k])``);
* ``rna``: draw an integer uniformly from {0, …, 99999} (``number_high``) and write it in decimal;

and insert the word at a uniformly drawn position among the len(words) + 1 gaps of ``p.split(" ")``, rejoining
with single spaces (the reference ``insert_rand_word``). The augmented text is re-encoded with
``model.encode_prompt``; the unconditional embedding is unchanged.

memobench choices (the reference code is silent or unsuitable):

* **Seeding.** The reference draws from the *global* ``numpy``/``random`` state, so the words a prompt gets depend
  on everything that ran before it. memobench uses one ``numpy.random.Generator`` per prompt, seeded from
  sha256(prompt sha256 | ``seed``): the same prompt and ``seed`` always get the same words, independent of order,
  ``--limit`` and sharding, and different prompts get different words. (The key is the *target prompt's*
  sha256, also when the conditioning's text came from a text-level attack.) All of a prompt's images (seeds) share
  one augmented prompt, as in the reference (one augmentation per prompt, then ``num_images_per_prompt``).
* **Default ``n_tokens`` = 4**: DCR's ``--rand_aug_repeats`` default and Wen's README baseline command
  (``--repeat_num 4``), and the middle column of NeMo's Table 1. MemBench's RTA/RNA rows use its CLI default
  ``--repeat_num 1`` (``--mitigation-param n_tokens=1``); NeMo's +1/+10 columns are ``n_tokens=1``/``10``.
* "Tokens" are inserted *words*: a decoded BPE token without its ``</w>`` end marker can re-tokenise into more
  than one token once surrounded by spaces; the exact count inserted is n words (as in the reference), which is
  what the trace records (``inserted``).
* When the conditioning carries no text (an attack that returns embeddings only, e.g. DoRI), there is nothing
  to augment: the conditioning is returned unchanged and the trace says so (``applied: false``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from memobench.api import BadInput, Conditioning, Mitigation, hookimpl, param


def prompt_rng(prompt_sha256: str, seed: int):
    """The per-prompt ``numpy.random.Generator`` (seeded from the prompt's sha256 and the plugin seed)."""
    import numpy as np

    h = hashlib.sha256(f"{prompt_sha256}|{int(seed)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:16], "big"))


def insert_word(text: str, word: str, rng) -> str:
    """Insert ``word`` at a uniform position among the len(words)+1 gaps of ``text.split(" ")``."""
    words = text.split(" ")
    words.insert(int(rng.integers(0, len(words) + 1)), word)
    return " ".join(words)


class _PromptAugmentation(Mitigation):
    kind = "inference"
    style = ""

    def _word(self, model, rng) -> str:
        raise NotImplementedError

    def augment(self, text: str, model, prompt_sha256: str) -> tuple[str, list[str]]:
        """The augmented text and the inserted words (deterministic for a prompt and ``seed``)."""
        rng = prompt_rng(prompt_sha256, self.params.seed)
        inserted = []
        for _ in range(int(self.params.n_tokens)):
            w = self._word(model, rng)
            inserted.append(w)
            text = insert_word(text, w, rng)
        return text, inserted

    def condition(self, model, prompt, cond, latents, ctx):
        if self.params.n_tokens < 0:
            raise BadInput(f"{self.name}: n_tokens must be ≥ 0")
        if cond.text is None:
            return Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds, text=None,
                                trace={**(cond.trace or {}), self.name: {
                                    "applied": False, "reason": "the conditioning has no text (embedding attack)"}})
        text, inserted = self.augment(cond.text, model, prompt.sha256)
        emb = model.encode_prompt(text).to(cond.prompt_embeds.device, cond.prompt_embeds.dtype)
        return Conditioning(emb, cond.negative_prompt_embeds, text=text,
                            trace={**(cond.trace or {}), self.name: {
                                "applied": True, "style": self.style, "original": cond.text, "augmented": text,
                                "inserted": inserted, "seed": self.params.seed}})


class RandomTokenAddition(_PromptAugmentation):
    """Random token addition (RTA; Somepalli et al. 2023 / Wen ``rand_word_add``): insert n random vocabulary tokens."""

    name = "rta"
    version = "1"
    style = "rand_word_add"

    @dataclass
    class Params:
        n_tokens: int = param(4, "DCR / Wen README baseline; MemBench RTA: 1; NeMo Table 1: 1, 4, 10")
        seed: int = param(0, "with the prompt's sha256, seeds the per-prompt generator")
        vocab_high: int = param(49400, "token ids drawn from [0, vocab_high) (reference: np.random.randint(49400))")

    def _word(self, model, rng) -> str:
        return model.tokenizer.decode([int(rng.integers(0, self.params.vocab_high))])


class RandomNumberAddition(_PromptAugmentation):
    """Random number addition (RNA; Somepalli et al. 2023 / Wen ``rand_numb_add``): insert n random integers."""

    name = "rna"
    version = "1"
    style = "rand_numb_add"

    @dataclass
    class Params:
        n_tokens: int = param(4, "numbers inserted (DCR / Wen default 4; MemBench RNA: 1)")
        seed: int = param(0, "with the prompt's sha256, seeds the per-prompt generator")
        number_high: int = param(100000, "integers drawn from [0, number_high) (reference: np.random.choice(100000))")

    def _word(self, model, rng) -> str:
        return str(int(rng.integers(0, self.params.number_high)))


@hookimpl
def register_mitigations(register):
    register(RandomTokenAddition)
    register(RandomNumberAddition)
