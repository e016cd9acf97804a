"""Offline analysis of run directories: load curves, fit Gao et al. (2022) forms, plot, tabulate."""
