"""The planner: a problem in, ranked plans out; no torch.

Modules, in the order a search runs:
  problem.py    the problem every search takes; stages, candidates, the choices a stage can make
  objective.py  the price of a stage on the ranks a search gives it (pdv.cost.terms), and J
  stages.py     the stage DP over layer ranges × slices of a device order
  sharding.py   CP-SAT per stage: a choice per layer, under the stage's memory
  baselines.py  hierarchy, uniform and pipedream: the same search with one assumption changed
  search.py     device orders, the generators, CP-SAT refinement, simulated ranking
  groups.py     devices → islands → one chain, from the measured bandwidth (used by search)
"""
