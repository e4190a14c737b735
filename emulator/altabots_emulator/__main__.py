"""``python -m altabots_emulator``: the same as the ``altabots-emulator`` command."""

from .cli import main

raise SystemExit(main())
