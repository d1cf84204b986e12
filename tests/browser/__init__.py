"""Headless-Chromium checks of the Prefect dashboard (see harness.py)."""
