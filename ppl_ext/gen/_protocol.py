"""The generative-function protocol: simulate / assess / generate, and traces."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
from jaxtyping import Array


class Trace(NamedTuple):
    """One run of a generative function.

    - `choices`: the random choices, a dict from site name to value;
    - `log_density`: `log q(choices)`, or for constructs with only estimable densities the
      log of an estimate `ŵ` with `E[ŵ | choices] = 1/q(choices)`, negated (see
      ../shared/DESIGN.md, proper weighting);
    - `retval`: the return value.
    """

    choices: dict[str, Array]
    log_density: Array
    retval: Any


class AbstractGenerativeFunction(eqx.Module):
    """A probabilistic program with a density over its random choices.

    Methods are called inside expectation programs (`px.expectation`): their random choices
    are `px.sample` sites, so each site's gradient estimator applies and the randomness
    comes from the expectation's key.
    """

    def simulate(self, *args, **kwargs) -> Trace:
        """Draw choices and return them with their log density and the return value."""
        raise NotImplementedError

    def assess(self, choices: dict[str, Array], *args, **kwargs) -> Array:
        """Log density of `choices` (all of the function's choices must be given)."""
        raise NotImplementedError

    def generate(
        self, constraints: dict[str, Array], *args, **kwargs
    ) -> tuple[Trace, Array]:
        """Draw the unconstrained choices; return the trace and the log importance weight.

        The weight is `log p(all choices) - log q(drawn choices)` where `q` is the law the
        unconstrained choices were drawn from.
        """
        raise NotImplementedError
