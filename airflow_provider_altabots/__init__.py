"""Apache Airflow provider for the AltaBots (and GPTBots) workflow API."""

__version__ = "0.1.0"
