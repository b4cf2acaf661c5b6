"""The HTTP server: a Sanic app (``app.create_app``) answering the OpenAI and Ollama APIs over one
``AsyncEngine``. No JAX here: requests reach the engine only through jaxserve.async_engine.
"""
