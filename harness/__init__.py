"""The run harness: everything around a DPO run that is not DPO (options, checks, errors, the output folder,
checkpoints, trackers, the model card, the TRL export). dpo.py calls it at the edges; a reader of the algorithm
can skip this folder and lose nothing of DPO."""
