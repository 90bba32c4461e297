"""Choosing a plan: exact allocation (multiple-choice knapsack), the shaped objective, the Optuna
layer, the Pareto front, and the planning pipeline that turns a PlanConfig into a Plan.

May import ``scoring``, ``artifact`` and everything below them; never ``cli``.
"""
