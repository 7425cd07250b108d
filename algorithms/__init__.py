"""Objective plugins (installed as diffrl_bench.algorithms)."""
