"""Replaying a recorded flow: ``rebuild`` (re-run a stage from what its manifest pins and prove its outputs),
``fork`` (continue a training stage from a pinned checkpoint under a new recipe) and ``release`` (bundle a
verified record for others and check one received)."""
