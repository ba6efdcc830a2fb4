"""Local stand-in of the ADEME data-fair API (dataset ``dpe03existant``): see docs/standin.md."""

from .data import Dataset
from .faults import Fault, Faults
from .limits import Limits, Tier
from .server import StandinServer, main

__all__ = ["Dataset", "Fault", "Faults", "Limits", "StandinServer", "Tier", "main"]
