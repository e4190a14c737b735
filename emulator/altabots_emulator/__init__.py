"""
A local emulator of the AltaBots/GPTBots workflow API, for trying workflows with no account.

It serves ``POST /v1/workflow/invoke``, ``POST /v1/workflow/query/result`` and
``GET /v1/api-key/verify`` as the vendor's pages describe them, with emulated runs whose
duration and outcome you choose, plus ``/_emulator/`` endpoints to inject faults (rate limits,
server errors, slow or dropped answers) and to inspect what a client did. It serves and calls
webhooks with aiohttp and imports nothing of the Airflow provider (nor does the provider import
it), so it can be trusted as an independent reading of the vendor's pages.

From the command line: ``altabots-emulator --port 8765`` (or
``python -m altabots_emulator``). From Python::

    from altabots_emulator import Emulator

    with Emulator(api_keys=["my-key"], run_seconds=1) as emulator:
        print(emulator.url)

Where the vendor's pages are silent, each module's docstring lists the emulator's own choices.
"""

__version__ = "0.1.0"

from .emulator import DEFAULT_API_KEY, Emulator
from .workflows import WorkflowConfig

__all__ = ["DEFAULT_API_KEY", "Emulator", "WorkflowConfig"]
