"""The HTTP server: a session API, an OpenAI-compatible API and metrics over one engine worker thread."""
