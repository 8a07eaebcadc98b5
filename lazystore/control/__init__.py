"""msgpack-over-unix-socket control protocol: framing, server, client."""
