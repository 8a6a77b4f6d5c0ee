"""evaluate stage: steered variants through the served endpoint; rates, intervals, tests, side effects, controls."""
