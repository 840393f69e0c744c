"""``/v1/ws`` (the multiplexed socket) and ``/v1/jobs/{id}/ws`` (one job's progress)."""
