"""Trace-driven simulation of placement: real policies and index, simulated workers and time."""
