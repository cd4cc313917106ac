"""`python -m benchmarks --preset cpu-smoke`: see README.md in this folder."""

from .harness import main

raise SystemExit(main())
