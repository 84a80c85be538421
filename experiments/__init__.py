"""Benchmarks and experiments (see RESULTS.md). A package so that a notebook in a checkout can
``from experiments import recall`` with the repository root on ``sys.path``."""
