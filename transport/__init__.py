"""tokenwire.transport: wire protocol, Chatterbox, QUIC glue, ECN socket, KV channel, CacheGen codec, SDK."""
