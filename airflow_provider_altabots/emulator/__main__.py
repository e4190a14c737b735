"""``python -m airflow_provider_altabots.emulator``: the same as the ``altabots-emulator`` command."""

from .cli import main

raise SystemExit(main())
