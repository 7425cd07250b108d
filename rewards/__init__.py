"""Reward plugins (installed as diffrl_bench.rewards)."""
