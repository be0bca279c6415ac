"""Locality analyses: DoRI's three tests of whether memorization is local, as ``memobench analyze locality``.

Paper: Kowalczuk*, Hintersdorf*, Struppek* et al., "Finding DoRI: Discovery of Retained Images in Diffusion Models",
ICML 2026 (arXiv 2507.16880); memobench ``METHODS.md`` §7.4 "Locality diagnostics", §8.1 "Locality figures".
The definitions, defaults and the choices the paper leaves open are in :mod:`.analysis`; the figures in
:mod:`.figures`; the command in :mod:`.cli`::

    memobench analyze locality --model tiny --target astronaut [--n-inits 100] [--seeds 0-9] [-o results]

It reuses the registered ``dori`` attack and the ``nemo`` and ``wanda`` mitigations through memobench's registry
(``NeMo.select_for_embedding``, ``Wanda.embedding_masks``). This module imports neither torch nor diffusers.
"""

from __future__ import annotations

from memobench.api import hookimpl


@hookimpl
def register_commands(app):
    from .cli import register

    register(app)
