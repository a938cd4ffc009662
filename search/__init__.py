"""Learns cache schedules: calibration of reuse errors, the DP solver, and the DEAP NSGA-II search seeded by both.

    from cachekit.search import calibrate, search_pipeline, solve, SolverConfig
    calibration = calibrate(pipe, prompts, num_steps=20, **pipeline_settings)   # one uncached run
    schedule = solve(calibration, SolverConfig.from_preset("default", budget=0.4)).schedule
    result = search_pipeline(pipe, prompts, 20, "runs/search", calibration=calibration, **pipeline_settings)
"""

from .calibrate import Calibration, CalibrationError, calibrate, calibrate_transformer
from .dp import InfeasibleError, Solution, SolverConfig, solve
from .genetic import SearchConfig, SearchResult, run_search
from .run import search_pipeline

__all__ = [
    "Calibration",
    "CalibrationError",
    "calibrate",
    "calibrate_transformer",
    "InfeasibleError",
    "Solution",
    "SolverConfig",
    "solve",
    "SearchConfig",
    "SearchResult",
    "run_search",
    "search_pipeline",
]
