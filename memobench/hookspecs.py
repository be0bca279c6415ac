"""Hook specifications of the ``memobench`` pluggy project (entry-point group ``memobench``).

A plugin module implements any subset of these with ``@memobench.hookimpl``. Each ``register`` callback
takes a class (``register(cls, aliases=())``); the class carries ``name``, ``version`` and ``Params``
(see :mod:`memobench.api`). Plugin modules must not import torch/diffusers at import time: import them inside
methods, so that ``memobench --help``, ``plugins`` and ``ls`` stay fast.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("memobench")
hookimpl = pluggy.HookimplMarker("memobench")


@hookspec
def register_models(register):
    """Register :class:`memobench.api.ModelPlugin` subclasses."""


@hookspec
def register_prompt_sets(register):
    """Register :class:`memobench.api.PromptSet` subclasses."""


@hookspec
def register_mitigations(register):
    """Register :class:`memobench.api.Mitigation` subclasses."""


@hookspec
def register_attacks(register):
    """Register :class:`memobench.api.Attack` subclasses."""


@hookspec
def register_metrics(register):
    """Register :class:`memobench.api.Metric` subclasses."""


@hookspec
def register_detectors(register):
    """Register :class:`memobench.api.Detector` subclasses (per-prompt memorization scores: ``memobench detect``)."""


@hookspec
def register_commands(app):
    """Add sub-commands to the ``memobench`` Typer application ``app``."""
