"""Offline analysis of run directories: load curves, fit Gao et al. (2022) forms, plot, tabulate.

load.py reads run directories and sweep folders; fit.py holds the functional forms and measures;
plots.py draws gold/proxy against sqrt(KL); report.py writes the tables and figures (and uploads
them to W&B).
"""
