"""Sessions: a conversation mapped onto named KV cache segments, its actions, character cards and persistence."""
