"""Verifiable reward sources, registered by name (``rewards: [{function: <name>, options: {...}}]``).

- ``math_accuracy`` / ``math_format`` (``verifiers.math_answers``): the final answer checked by
  ``math-verify``; the answer's format (``<think>``/``<answer>`` tags, a boxed answer).
- ``code_tests`` (``verifiers.code``): the completion's code run against the row's tests in a
  sandbox (``verifiers.sandbox``).
- ``reasoning_gym:<task>`` (``verifiers.reasoning_tasks``): a ``reasoning-gym`` task's own scorer;
  ``reasoning_gym_rows`` writes its prompts.
- ``llm_judge`` (``verifiers.judge``): a judge model behind an OpenAI-compatible endpoint.

Each is a class built once with its options and called with TRL's signature
``(prompts, completions, **row_fields) -> list[float | None]``; the per-sample functions under
them (``math_score``, ``run_tests``, ``score_answer``, ``LLMJudge.score``) serve environments
too. Importing this package is cheap: ``math-verify``, ``reasoning-gym`` and the sandbox's tools
are loaded when a source is built.
"""

from alignkit.rollout.verifiers import code, judge, math_answers, reasoning_tasks

__all__ = ["code", "judge", "math_answers", "reasoning_tasks"]
