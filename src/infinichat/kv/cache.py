"""`KVCache`, the name the forward tests and older callers use, is the tensor store `KVStore`."""

from infinichat.kv.store import KVStore

KVCache = KVStore
