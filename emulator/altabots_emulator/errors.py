"""
Error answers of the emulator, in the two shapes the vendor uses.

The emulator speaks one error style, chosen when it starts:

* ``gptbots`` (the default): ``{"code": 40127, "message": "..."}``, the shape of the GPTBots
  API reference.
* ``altabots``: ``{"error": {"code": "40127", "message": "...", "status": 401}}``, the shape of
  the AltaBots API overview.

Vendor codes (from the vendor's wider documentation): 40000 parameter error, 40127
authentication failed, 20022 insufficient credits, 20055 API switched off for the agent,
50000 internal error.

Emulator's own choices, where the pages are silent:

* In the ``altabots`` style the ``code`` is the same number written as a string ("40127"), and
  ``status`` is the HTTP status actually sent with the body (so 200 for an ``error_in_200``
  fault).
* The HTTP status that goes with each code: 40000 -> 400, 40127 -> 401, 50000 -> 500 (or the
  status a ``server_errors`` fault asks for).
* Codes the vendor does not document, used only where the emulator needs one: 40400 for an
  unknown path (HTTP 404), 40500 for a wrong method (HTTP 405), 41300 for a body that is too
  large (HTTP 413), 42900 for a rate-limited request (HTTP 429).
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

ErrorStyle = Literal["gptbots", "altabots"]

#: The error styles the emulator can speak.
ERROR_STYLES: Final = ("gptbots", "altabots")

PARAMETER_ERROR: Final = 40000
AUTH_FAILED: Final = 40127
INSUFFICIENT_CREDITS: Final = 20022
API_SWITCHED_OFF: Final = 20055
INTERNAL_ERROR: Final = 50000

# The emulator's own codes (not vendor facts; see the module docstring).
NOT_FOUND: Final = 40400
METHOD_NOT_ALLOWED: Final = 40500
BODY_TOO_LARGE: Final = 41300
RATE_LIMITED: Final = 42900


def error_body(style: str, code: int, message: str, status: int) -> dict[str, Any]:
    """The error body a client receives, in the given style, for a vendor ``code``."""
    if style == "altabots":
        return {"error": {"code": str(code), "message": message, "status": status}}
    return {"code": code, "message": message}


def encode_error(style: str, code: int, message: str, status: int) -> bytes:
    """The error body as the JSON bytes sent on the wire."""
    return json.dumps(error_body(style, code, message, status), separators=(",", ":")).encode()


def code_for_status(status: int) -> int:
    """The code the emulator puts in an error body answered with HTTP ``status``."""
    return {
        400: PARAMETER_ERROR,
        401: AUTH_FAILED,
        404: NOT_FOUND,
        405: METHOD_NOT_ALLOWED,
        413: BODY_TOO_LARGE,
        429: RATE_LIMITED,
    }.get(status, INTERNAL_ERROR if status >= 500 else PARAMETER_ERROR)
