"""Pack of LLMs: test-time fusion of causal language models."""
