"""The bodies of the scripts in scripts/: ``train`` (train.py), ``evaluate`` (eval.py), ``inference``
(extract.py, export.py, search.py), called with the composed Hydra config."""
