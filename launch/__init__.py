"""Command-line entry points and the sweep machinery behind launch/sweep.py.

- train.py: one run (method-table dispatch, report after the run).
- sweep.py: the sweep command line.
- sweep_plan.py: a sweep file expanded into planned, validated runs and their command lines.
- runner.py: the one run loop (locks, skip-completed, resume, outcomes, sweep.json, the progress
  table) and its local-process backend.
- executor.py: its submitit backend (local job arrays or Slurm) and the task each job runs.
"""
