"""jaxserve HTTP server (OpenAI- and Ollama-compatible); see issue 4."""
