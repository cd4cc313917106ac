"""`python -m zone_benchmarks --preset cpu-smoke`: see README.md in this folder."""

from .options import bench_main

raise SystemExit(bench_main())
