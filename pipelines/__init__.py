"""Runs pipelines with schedules: drop-in wrapper, streaming runner, server."""
