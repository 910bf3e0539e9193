"""The reference: every Duo equation of duo-math in plain PyTorch, float64 where it matters.

It is the oracle every kernel is tested against and the fallback every machine can run.
"""
