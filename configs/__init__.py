"""Typed experiment presets (frozen dataclasses), one module per experiment.

``configs`` depends only on ``jaxattn`` (for static masks) and the standard library: experiments import their
presets from here, never the other way round.
"""
