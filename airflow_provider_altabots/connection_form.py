"""
The ``altabots`` connection form, defined once for every Airflow line.

Airflow 3.2 and later read a provider's form from its metadata: ``conn-fields`` and
``ui-field-behaviour`` in :func:`~airflow_provider_altabots.get_provider_info.get_provider_info`.
Airflow 2.11 to 3.1 ask the hook instead (``get_connection_form_widgets`` and
``get_ui_field_behaviour``), and turn WTForms fields into the form. Both shapes are derived here
from :data:`EXTRA_FIELDS` and :data:`BEHAVIOUR`, so the form is the same on every line.

WTForms and Flask-AppBuilder are imported only inside :func:`form_widgets`, which only the UI
(or Airflow's providers manager) calls: parsing a DAG never pays for them. This module imports
nothing of Airflow's nor of this provider's: Airflow reads the provider's metadata while it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: ``auth_scheme`` values: ``bearer`` sends ``Authorization: Bearer <key>`` (newer pages);
#: ``raw`` sends ``Authorization: <key>`` (older pages).
AUTH_SCHEMES = ("bearer", "raw")
#: Seconds one request may take in all (connect, send and every read), unless the connection's
#: ``timeout`` extra says otherwise.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: The largest answer read, in bytes after decompression (connection extra ``max_answer_bytes``).
#: A run record is its output plus a few fields; 8 MiB holds any text output a workflow is likely
#: to give, while a runaway or hostile answer cannot fill a worker's memory or the XCom table.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
#: The highest ``requests_per_minute`` accepted: a thousand requests a second.
MAX_REQUESTS_PER_MINUTE = 60_000.0


@dataclass(frozen=True)
class ExtraField:
    """
    One field of the connection's *extra*, as the form shows it.

    :param name: the key in the connection's extra.
    :param label: the field's label in the form.
    :param description: the help text under it.
    :param kind: ``choice`` (text limited to ``choices``), ``number`` (any number, typed as text
        on lines whose forms have no decimal field) or ``integer``.
    :param default: the value the form starts with; ``None``: empty.
    :param choices: the accepted values of a ``choice``.
    :param above: numbers must be above this.
    :param most: numbers must be at most this.
    """

    name: str
    label: str
    description: str
    kind: Literal["choice", "number", "integer"]
    default: str | float | int | None = None
    choices: tuple[str, ...] = ()
    above: float = 0
    most: float | None = None

    def schema(self) -> dict[str, Any]:
        """The field as a JSON schema (``conn-fields``: Airflow 3.2 and later)."""
        kinds = {"choice": "string", "number": "number", "integer": "integer"}
        schema: dict[str, Any] = {"type": [kinds[self.kind], "null"]}
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.kind != "choice":
            schema["exclusiveMinimum"] = self.above
            if self.most is not None:
                schema["maximum"] = self.most
        if self.default is not None:
            schema["default"] = self.default
        return schema


@dataclass(frozen=True)
class FormBehaviour:
    """How the form treats Airflow's standard connection fields."""

    hidden: tuple[str, ...]
    relabeling: dict[str, str] = field(default_factory=dict)
    placeholders: dict[str, str] = field(default_factory=dict)


EXTRA_FIELDS: tuple[ExtraField, ...] = (
    ExtraField(
        "auth_scheme",
        "Auth scheme",
        "bearer sends 'Authorization: Bearer <key>' (current hosts); raw sends the bare key "
        "(older GPTBots pages).",
        "choice",
        default=AUTH_SCHEMES[0],
        choices=AUTH_SCHEMES,
    ),
    ExtraField(
        "timeout",
        "Request timeout (seconds)",
        "Seconds one API request may take in all: connect, send and every read.",
        "number",
        default=int(DEFAULT_REQUEST_TIMEOUT),
    ),
    ExtraField(
        "max_answer_bytes",
        "Largest answer (bytes)",
        "The largest answer read, after decompression; a run whose record is larger fails with a "
        "message naming this field.",
        "integer",
        default=MAX_ANSWER_BYTES,
    ),
    ExtraField(
        "requests_per_minute",
        "Plan's requests per minute",
        "The rate your plan allows this key, if you know it (GPTBots free: 3). Empty: learnt from "
        "the API's rate-limit headers and 429 answers.",
        "number",
        most=MAX_REQUESTS_PER_MINUTE,
    ),
)

BEHAVIOUR = FormBehaviour(
    hidden=("schema", "login", "port"),
    relabeling={"host": "Base URL", "password": "API key"},
    placeholders={
        "host": "https://altatech.ai (GPTBots: https://api-sg.gptbots.ai, -th, -jp)",
        "password": "the workflow's API key",
    },
)


def conn_fields() -> dict[str, Any]:
    """``conn-fields`` of the provider's metadata (read by Airflow 3.2 and later)."""
    return {
        extra.name: {"label": extra.label, "description": extra.description, "schema": extra.schema()}
        for extra in EXTRA_FIELDS
    }


def ui_field_behaviour() -> dict[str, Any]:
    """``ui-field-behaviour`` of the provider's metadata (read by Airflow 3.2 and later)."""
    return {
        "hidden-fields": list(BEHAVIOUR.hidden),
        "relabeling": dict(BEHAVIOUR.relabeling),
        "placeholders": dict(BEHAVIOUR.placeholders),
    }


def hook_field_behaviour() -> dict[str, Any]:
    """What ``get_ui_field_behaviour`` returns (read by Airflow 2.11 to 3.1): the same, in snake case."""
    return {key.replace("-", "_"): value for key, value in ui_field_behaviour().items()}


def form_widgets() -> dict[str, Any]:
    """
    What ``get_connection_form_widgets`` returns (read by Airflow 2.11 to 3.1): WTForms fields.

    Those lines accept text, integer, password and boolean fields only, so a number that may have
    decimals is a text field; the hook checks every value before a request either way. Airflow
    3.0 and 3.1 call this with stand-ins for WTForms, which read the same arguments.
    """
    from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import IntegerField, StringField
    from wtforms.validators import NumberRange, Optional, any_of

    widgets: dict[str, Any] = {}
    for extra in EXTRA_FIELDS:
        validators: list[Any] = [Optional()]
        if extra.choices:
            validators.append(any_of(list(extra.choices)))
        field_class = StringField
        if extra.kind == "integer":
            field_class = IntegerField
            validators.append(NumberRange(min=1))
        widgets[extra.name] = field_class(
            lazy_gettext(extra.label),
            validators=validators,
            description=extra.description,
            default=extra.default,
            widget=BS3TextFieldWidget(),
        )
    return widgets
