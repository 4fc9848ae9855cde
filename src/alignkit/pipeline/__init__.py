"""Multi-stage pipelines: SFT -> reward model -> PPO, DPO -> PPO -> IPO, with evaluation between.

Seed 002 §4.2.1 (the three-stage RLHF pipeline) and §4.4.4 (hybrid schedules). A pipeline is a
YAML file of stages (`alignkit.pipeline.spec`); `alignkit pipeline FILE` runs it
(`alignkit.pipeline.runner`), skipping finished stages and resuming interrupted ones.
"""

from alignkit.pipeline.runner import StageRecord, run_pipeline, summary_table
from alignkit.pipeline.spec import PipelineError, PipelineSpec, Stage, load_pipeline
from alignkit.pipeline.tools import TOOLS, register_tool

__all__ = [
    "TOOLS",
    "PipelineError",
    "PipelineSpec",
    "Stage",
    "StageRecord",
    "load_pipeline",
    "register_tool",
    "run_pipeline",
    "summary_table",
]
