"""Behaviour evaluation: detectors and rates with confidence intervals."""

from ga_ray.evaluation.detectors import DETECTORS, Rate, behaviour_rate, rate, wilson_interval

__all__ = ["DETECTORS", "Rate", "behaviour_rate", "rate", "wilson_interval"]
