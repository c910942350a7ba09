"""The cost model: pure functions of (profile, cluster, plan); no torch.

Modules, in the order they build on each other:
  comm.py       α-β point-to-point and ring collectives on the measured links (every formula)
  compute.py    what a model profile says about each layer; a device's speed and overhead
  terms.py      each layer's cost terms under a choice, and how a stage composes them
  stage.py      one stage of a plan priced on its every rank, ring and transfer (StageCost)
  schedules.py  torch.distributed.pipelining's schedules as per-rank-group op orders
  validity.py   the one check of a plan that plan, simulate and run all call
  simulate.py   the event-driven step simulation, Predicted
  trace.py      Chrome/Perfetto trace and the text timeline
"""
