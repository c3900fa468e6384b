"""Placement policies, one per file; build them with ``lmdisagg.router.policy.make_policy``."""
