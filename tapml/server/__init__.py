"""`tapml serve`: the OpenAI-compatible HTTP API (app), its requests, and the model worker."""
