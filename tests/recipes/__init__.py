"""Tests of dq3jax.recipes."""
