"""Cold-start benchmark harness (issue 6): lazystore against Nix substitution
and layered OCI images, over a shaped link.

- ``workloads``: build the closures with real Nix and write signed binary caches.
- ``measure``: cold state, time to first output, resource figures.
- ``modes``: one function per mode; each returns a run record or raises Skip.
- ``report``: medians, ranges, pairwise ratios, JSON, Markdown and the plot.
- ``cli``: ``bench/run``.
"""
