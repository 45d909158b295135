"""Benchmarks of the pipeline and its methods; each module writes bench/results/NAME.json and an MLflow run.

Run one from the project folder as ``medexperts bench NAME [ARGS...]`` (or ``python -m bench.NAME``); the
modules import each other as ``bench.common``, ``bench.experts``, ...
"""
