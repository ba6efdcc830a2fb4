"""Local stand-in of the ADEME data-fair API (dataset ``dpe03existant``): see docs/standin.md."""

from .data import Dataset, LiveChanges
from .faults import Fault, Faults
from .limits import Limits, Tier
from .server import StandinServer, main

__all__ = ["Dataset", "LiveChanges", "Fault", "Faults", "Limits", "StandinServer", "Tier", "main"]
