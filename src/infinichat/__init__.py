"""infinichat: LLM conversations of unlimited length inside a fixed memory budget."""

__version__ = "0.1.0"
