"""``python -m ragguard`` is the ``ragguard`` command."""

from .cli import main

raise SystemExit(main())
