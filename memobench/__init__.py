"""memobench: does a memorization mitigation for text-to-image diffusion models actually hold?

Public API for plugin authors: :mod:`memobench.api` (plugin base classes and value types),
:data:`memobench.hookimpl`, :mod:`memobench.model` (the diffusers model adapter), :mod:`memobench.sscd`,
:mod:`memobench.stats`, :mod:`memobench.data` and :mod:`memobench.cache`.
"""

from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
