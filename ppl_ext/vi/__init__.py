"""Objective language constructs and the objective library (ELBO, IWELBO, ...)."""

from ._objectives import elbo as elbo, iwelbo as iwelbo

__all__ = ["elbo", "iwelbo"]
