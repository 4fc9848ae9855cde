"""The ``environment`` settings of the online-RL configs: multi-turn episodes with an
environment and its tools (torch-free; ``rollout.episodes`` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.config.schema import field_help
from alignkit.trainers.policy_config import _require

__all__ = ["EnvironmentConfig"]


@dataclass
class EnvironmentConfig:
    """Multi-turn episodes with an environment and its tools (docs/environments.md)."""

    name: str = field(
        default="single_turn",
        metadata=field_help(
            "A registered environment (single_turn, calculator), 'module:Class' or "
            "'path/to/file.py:Class'; one instance per episode."
        ),
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata=field_help("Keyword arguments of the environment class.")
    )
    max_turns: int = field(
        default=4, metadata=field_help("Assistant turns per episode (each one generate call).")
    )
    max_tool_calls: int = field(
        default=8,
        metadata=field_help("Tool calls per episode; later calls get an error message back."),
    )
    max_length: int = field(
        default=2048,
        metadata=field_help("Tokens per episode (prompt, turns and tool results); then it ends."),
    )
    tool_timeout: float = field(
        default=10.0, metadata=field_help("Seconds per tool call; then an error message.")
    )
    tool_isolation: Literal["thread", "process"] = field(
        default="thread",
        metadata=field_help(
            "thread: stop waiting at the timeout; process: run each call in a forked process, "
            "killed at the timeout (for tools that may loop forever)."
        ),
    )
    max_tool_output_chars: int = field(
        default=2000, metadata=field_help("A tool's result is cut to this many characters.")
    )
    tool_format: str = field(
        default="auto",
        metadata=field_help(
            "How tool calls are written: auto (from the chat template), hermes "
            "(<tool_call>{json}</tool_call>), json (a bare {name, parameters} object)."
        ),
    )
    check_token_stream: bool = field(
        default=False,
        metadata=field_help(
            "Check every episode's token stream against apply_chat_template of its "
            "conversation; log env/stream_* (docs/environments.md)."
        ),
    )

    def __post_init__(self) -> None:
        _require(self.max_turns >= 1, "environment.max_turns must be >= 1")
        _require(self.max_tool_calls >= 0, "environment.max_tool_calls must be >= 0")
        _require(self.max_length >= 2, "environment.max_length must be >= 2")
        _require(self.tool_timeout > 0, "environment.tool_timeout must be > 0")
        _require(self.max_tool_output_chars >= 1, "environment.max_tool_output_chars must be >= 1")

    def limits(self) -> Any:
        """The rollout's ``EpisodeLimits``."""
        from alignkit.rollout.episodes import EpisodeLimits

        return EpisodeLimits(
            max_turns=self.max_turns,
            max_tool_calls=self.max_tool_calls,
            max_length=self.max_length,
            tool_timeout=self.tool_timeout,
            tool_isolation=self.tool_isolation,
            max_tool_output_chars=self.max_tool_output_chars,
        )
