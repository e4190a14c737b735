"""
Memory the per-key request budgets hold in one triggerer: many API keys, each with a busy past.

Each key's budget is made through ``Budgets.of`` (as the hook makes it) and then answers
``--requests`` requests, a few a second, with ``X-RateLimit-*`` figures; the figures printed are
what tracemalloc counts as still allocated once every key has had its history. ``--budget``
measures another copy of ``budget.py`` (an older one, say) in place of the package's. Prints
figures; asserts nothing.

    python bench/budget_memory.py
    python bench/budget_memory.py --budget /some/where/budget.py
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import sys
import time
import tracemalloc
from types import ModuleType

from airflow_provider_altabots.protocol import ConnectionSettings, Quota


def budget_module(path: str | None) -> ModuleType:
    """The package's budget module, or the one in the file at ``path``."""
    if path is None:
        from airflow_provider_altabots import budget

        return budget
    spec = importlib.util.spec_from_file_location("measured_budget", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def busy_history(policy: object, requests: int, ends_at: float) -> None:
    """``requests`` answered requests, 5 a second, in hourly windows, ending at ``ends_at``."""
    began = ends_at - requests / 5.0
    for number in range(requests):
        at = began + number / 5.0
        ticket = policy.grant(at)  # type: ignore[attr-defined]
        window_ends = (at // 3600 + 1) * 3600
        quota = Quota(100_000, 100_000 - number, window_ends)
        policy.observe(ticket, at + 0.1, refused=False, quota=quota)  # type: ignore[attr-defined]


async def measure(module: ModuleType, keys: int, requests: int) -> tuple[int, int]:
    """Bytes still allocated for ``keys`` budgets with their history, and how many are kept."""
    gc.collect()
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    budgets = module.Budgets()
    # Histories end a while ago on the monotonic clock, so that no budget is still held back.
    ends_at = time.monotonic() - 120.0
    for key in range(keys):
        settings = ConnectionSettings("bench", "https://api.example.test", f"key-{key}")
        busy_history(budgets.of(settings).policy, requests, ends_at)
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kept = sum(len(per_loop) for per_loop in budgets._budgets.values())
    return current - start, kept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", help="a budget.py to measure instead of the package's")
    parser.add_argument("--keys", type=int, default=2000, help="API keys (default 2000)")
    parser.add_argument("--requests", type=int, default=5000, help="answered requests per key (default 5000)")
    args = parser.parse_args()
    module = budget_module(args.budget)
    began = time.monotonic()
    used, kept = asyncio.run(measure(module, args.keys, args.requests))
    print(f"budget module:   {args.budget or module.__name__}")
    print(f"keys:            {args.keys}, each with {args.requests} answered requests")
    print(f"budgets kept:    {kept}")
    print(f"memory held:     {used / 1e6:.2f} MB ({used / args.keys / 1e3:.1f} KB per key made)")
    print(f"measured in:     {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
