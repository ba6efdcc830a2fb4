"""dpe-devkit: the harness beside the product, never inside it.

The local bench (``testbed``: real Kafka, PostgreSQL, helm, the single-node test cluster and the
images it runs) and ``local_run`` (the whole pipeline as local processes). Installed by
``scripts/setup`` from this checkout, never by the images. It imports ``dpe_ingest``; ``dpe_ingest``
never imports it (tests/test_imports.py checks the direction) except through the two CLI commands
``dpe-ingest testbed`` and ``dpe-ingest run``, which load it by name and say how to install it.
"""
