"""Tests of dq3jax.io."""
