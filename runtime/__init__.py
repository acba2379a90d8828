"""Generation on top of a compiled plan: tokenizer, KV state, sampling."""
