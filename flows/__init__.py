"""Prefect flows and the `medexperts` CLI: thin drivers over `components`."""
