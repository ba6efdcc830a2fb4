"""Dead letters: their format is part of the message contract, :mod:`dpe_ingest.messages` (this name stays
for the producer and users' tools)."""

from .messages import build, consumer_id, producer_id
from .messages import parse_dead_letter as parse

__all__ = ["build", "consumer_id", "parse", "producer_id"]
