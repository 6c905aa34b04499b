"""
Hypothesis's decorators with types mypy's ``disallow_any_decorated`` accepts.

``hypothesis.given`` is annotated as returning ``Callable[..., None]`` and the stateful
``rule``/``initialize`` as ``Callable[..., None] -> Callable[..., None]``: every test they
decorate would carry an ``Any``. These are the very same functions (``given is
hypothesis.given`` at runtime), re-annotated once here instead of a cast or an ignore at each
of the ~50 decorated tests:

- ``given(...)(f)`` is a :class:`HypothesisTest`: callable with whatever arguments hypothesis
  did not draw (pytest fixtures), returning ``None``, as hypothesis's own wrapper does;
- ``rule(...)``/``initialize(...)`` keep the decorated method's own signature.

Only the plain forms are re-exported: ``rule(target=...)`` (bundles) is not used by this suite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ParamSpec, Protocol

import hypothesis
import hypothesis.stateful

if TYPE_CHECKING:
    from collections.abc import Callable

    from hypothesis.strategies import SearchStrategy

__all__ = ["HypothesisTest", "given", "initialize", "rule"]

P = ParamSpec("P")


class HypothesisTest(Protocol):
    """What ``@given`` returns: the test, minus the arguments hypothesis draws."""

    def __call__(self, *args: object, **kwargs: object) -> None: ...


if TYPE_CHECKING:

    def given(
        *args: SearchStrategy[object], **kwargs: SearchStrategy[object]
    ) -> Callable[[Callable[P, object]], HypothesisTest]: ...

    def rule(
        **kwargs: SearchStrategy[object],
    ) -> Callable[[Callable[P, None]], Callable[P, None]]: ...

    def initialize(
        **kwargs: SearchStrategy[object],
    ) -> Callable[[Callable[P, None]], Callable[P, None]]: ...

else:
    given = hypothesis.given
    rule = hypothesis.stateful.rule
    initialize = hypothesis.stateful.initialize
