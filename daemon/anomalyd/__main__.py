"""``python -m anomalyd`` is the ``anomalyd`` command."""

from anomalyd.cli import main

raise SystemExit(main())
