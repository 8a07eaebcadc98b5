"""``python -m bench.harness`` (what bench/run does)."""

from bench.harness.cli import main

raise SystemExit(main())
