"""Fused ops: registered torch ops, their eager references, and backend dispatch."""
