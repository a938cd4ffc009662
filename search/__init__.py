"""Learns cache schedules: calibration of reuse errors, the DP solver (and, later, DEAP genetic search).

    from cachekit.search import calibrate, solve, SolverConfig
    calibration = calibrate(pipe, prompts, num_steps=20, **pipeline_settings)   # one uncached run
    schedule = solve(calibration, SolverConfig.from_preset("default", budget=0.4)).schedule
"""

from .calibrate import Calibration, CalibrationError, calibrate, calibrate_transformer
from .dp import InfeasibleError, Solution, SolverConfig, solve

__all__ = [
    "Calibration",
    "CalibrationError",
    "calibrate",
    "calibrate_transformer",
    "InfeasibleError",
    "Solution",
    "SolverConfig",
    "solve",
]
