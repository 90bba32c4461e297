"""Choosing a plan: its settings (:mod:`.config`), exact allocation (multiple-choice knapsack), the
shaped objective, the Optuna layer, the Pareto front, and the planning pipeline that turns a
PlanConfig into a Plan on one machine or many.

May import ``scoring``, ``train``, ``runtime``, ``sources``, ``artifact`` and everything below
them; never ``build``, ``verify`` or ``cli``.
"""
