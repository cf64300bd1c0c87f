"""The ``pserver bench`` click command."""

from __future__ import annotations

import click


@click.command()
def bench() -> None:
    """Throughput and latency benchmark against a running or self-started cluster."""
    raise click.ClickException("not written yet")
