"""v3-pydoc: a small DeepSeek-V3-architecture model trained on Python's reference manual.

corpus (the text and its fixed held-out split), tokenizer (byte-level BPE), spec (config and
hyper-parameters), optim (AdamW), train (the loop with V3's expert balancing), evaluate (perplexity,
next-token stats, router margins), run (`python -m dq3jax.train OUT_DIR`: everything, written as goldens).
"""
