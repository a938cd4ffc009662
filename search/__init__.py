"""Learns cache schedules: DEAP genetic search, DP solver, calibration."""
