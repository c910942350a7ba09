"""The planner: groups, stage DP, CP-SAT sharding, baselines; no torch."""
