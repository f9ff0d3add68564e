"""``python -m pipeline``."""

from pipeline import _signals

_signals.hold()  # first: a SIGTERM while the rest is imported stops the worker cleanly

from pipeline.cli import main  # noqa: E402

raise SystemExit(main())
