"""`alignkit recommend`: which alignment method fits this data, model, machine and need.

Seed 002 exercise 4.4 asks for an algorithm selector. alignkit's is a table of documented,
deterministic rules (`alignkit.recommend.rules.RULES`) over measured features, with hard
feasibility checks (data format, reward source, memory) kept apart from the scores.
"""

from alignkit.recommend.features import (
    Features,
    Requirements,
    Resources,
    measure_data,
    measure_model,
    measure_resources,
)
from alignkit.recommend.report import RECOMMENDATION_SCHEMA, print_recommendation
from alignkit.recommend.scoring import Recommendation, recommend, score_methods, write_config

__all__ = [
    "RECOMMENDATION_SCHEMA",
    "Features",
    "Recommendation",
    "Requirements",
    "Resources",
    "measure_data",
    "measure_model",
    "measure_resources",
    "print_recommendation",
    "recommend",
    "score_methods",
    "write_config",
]
