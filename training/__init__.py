"""Training code for the example forecasting models (needs the ``models`` extra: torch)."""
