"""The Llama architecture (Llama 2/3, SmolLM2, TinyLlama, ...)."""
