"""dpe-ingest: ADEME DPE diagnostics, department by department, through Kafka into PostgreSQL."""

__version__ = "0.1.0"
