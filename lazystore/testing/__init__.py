"""Real helpers for tests and benchmarks (as trio.testing): plain modules, no pytest.

nixcache (real Nix builds and signed binary caches), httpserver (a folder over
HTTP on 127.0.0.1), daemon (``lazystore mount`` as a subprocess), containerd (a
private containerd), registry (a private docker-registry), cri (a CRI client and a Kubernetes
node's stack) and proxies
(nginx and Squid with deploy/'s configurations). Nothing in the
package proper imports them."""
