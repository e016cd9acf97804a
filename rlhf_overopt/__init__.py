"""Reward-model overoptimization research framework for RLHF."""
