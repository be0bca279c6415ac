"""Baselines every pairing needs: the unmitigated model and the un-attacked prompt.

* mitigation ``none`` — the model as released (NeMo Table 1 "All neurons active"; DoRI "no mitigation").
* attack ``none`` (alias ``prompt``) — generate from the target's own prompt (DoRI's "Memorized prompts" row):
  the implicit "no attack" row of every mitigation × attack pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

from memobench.api import Attack, AttackOutput, Conditioning, Mitigation, hookimpl


class NoMitigation(Mitigation):
    """The unmitigated model."""

    name = "none"
    version = "1"
    kind = "none"
    prompt_independent = True  # the same model for every prompt

    @dataclass
    class Params:
        pass


class PromptAttack(Attack):
    """No attack: the conditioning is the target's own prompt, encoded by the model's text encoder."""

    name = "none"
    version = "1"
    is_identity = True

    @dataclass
    class Params:
        pass

    def run(self, model, prompt, reference, ctx) -> AttackOutput:
        return AttackOutput(Conditioning(model.encode_prompt(prompt.text), model.empty_embedding(), text=prompt.text))


@hookimpl
def register_mitigations(register):
    register(NoMitigation)


@hookimpl
def register_attacks(register):
    register(PromptAttack, aliases=("prompt",))
