"""Tests of dq3jax.model."""
