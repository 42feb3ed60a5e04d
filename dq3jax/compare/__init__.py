"""Comparing an output with a reference: logit statistics (llama-perplexity's), float and byte metrics."""
