"""Checkpoint readers and writers."""
