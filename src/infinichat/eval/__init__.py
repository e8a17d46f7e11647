"""Evaluation over the engine: long-text perplexity under KV policies (`ppl`), its plot (`plot`)."""
