"""Prefect flows that drive the DVC pipeline (``flows/bootstrap.py``)."""
