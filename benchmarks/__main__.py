"""``python -m benchmarks``: the whole suite (see :mod:`benchmarks.suite`)."""

from .suite import main

raise SystemExit(main())
