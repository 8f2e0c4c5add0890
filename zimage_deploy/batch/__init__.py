"""Batch production: `python -m zimage_deploy.batch` (see job.py) — rows of requests in (JSONL, CSV, text), images
and `results.jsonl` out, resumable, on one runtime or on Ray Data actors.

inputs.py (reading rows, templates) -> plan.py (checked requests, seeds, names, fingerprints, groups) ->
execute.py (runtime calls, atomic writes) / ray_data.py (the same on Ray Data) -> results.py (records, resume,
summary).
"""
