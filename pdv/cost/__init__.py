"""The cost model: pure functions of (profile, cluster, plan); no torch.

Modules, in the order they build on each other:
  comm.py       α-β point-to-point and ring collectives on the measured links
  compute.py    layer and stage time and memory read from a model profile
  stage.py      one stage priced on its devices and links (StageCost)
  schedules.py  torch.distributed.pipelining's schedules as per-rank-group op orders
  simulate.py   the event-driven step simulation, its closed form, Predicted
  trace.py      Chrome/Perfetto trace and the text timeline
"""
