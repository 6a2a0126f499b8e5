"""tokenwire.daemon: the edge service (config, sessions, upstreams, KV store, metrics) and the CLI."""
