"""The cost model: pure functions of (profile, cluster, plan); no torch."""
