"""Evaluation: policy metrics on tasks with programmatic judges, reward-model metrics."""

from alignkit.eval.task import TaskEvaluation, evaluate_synthetic_task

__all__ = ["TaskEvaluation", "evaluate_synthetic_task"]
