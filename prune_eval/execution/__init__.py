"""The execution side: plan, launch and run cells; answer questions; write records.

- `sweep`: plan a sweep before launching it (validate every job, one cell per experiment, seeds a
  method does not use share a cell), plan.json, the closing status table.
- `schedule`: cost estimates, model groups, packing cells into SLURM tasks (pure).
- `checks`: launcher settings, local GPUs and the SLURM cluster, checked before anything starts.
- `local` (launch=local, launch=local-gpus), `slurm` (launch=slurm): where workers run.
- `worker`: a worker process runs many cells; `resident`: the model it keeps between them.
- `watching`: how a launched cell ended, read from its files; the progress line.
- `cell`: one cell: locks, shards, resume, summary; `events`: launches.jsonl.
- `engine` (the reference path and shared decoding), `fast` (the fast path).
- `records` (record parts and atomic writes) and `faults` (kill points for tests): shared with the
  analysis side, importable without torch (like this package's __init__).
"""
