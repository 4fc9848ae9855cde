"""Reward-model ensembles as one reward source (seed 002 §4.3, exercise 4.3).

A ``RewardEnsemble`` holds K reward (or cost) models. ``member_scores(prompts, responses)``
returns ``[K, N]``: the texts are tokenised once per group of members sharing a tokenizer and
scored in batches (a loop over batches and members, none over samples). ``combine`` applies
``mean``, ``weighted`` (by validation accuracy), ``median``, ``trimmed_mean`` or ``stacking``
(weights fitted on held-out pairs, ``fit_stacking``); ``score`` is the uncertainty-penalised
reward ``combined - k * std`` (``combined + k * std`` for a cost, where higher is worse), the
conservative estimate against reward hacking (Coste et al. 2024, "Reward Model Ensembles Help
Mitigate Overoptimization"). The formulas live in ``alignkit.ops.evaluation``.

A single reward model loads as an ensemble of one (std 0), so every evaluation takes both.
An ensemble run directory (``alignkit train rm-ensemble``) holds ``ensemble.json``::

    {"kind": "reward", "members": [{"name": "member-0", "checkpoint": "member-0/checkpoints/
     step-20/model", "validation_accuracy": 0.8}, ...], "stacking": null | [w_1, ..., w_K]}

``__call__(prompts, completions, rows)`` follows the rollout ``RewardSource`` protocol.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import CheckpointError, ConfigError
from alignkit.models.reward import CONFIG_FILE, load_reward_model, reward_scores
from alignkit.models.scoring import score_texts
from alignkit.ops.evaluation import COMBINATIONS, combine_rewards, pair_uncertainty
from alignkit.ops.preference import reward_model_loss
from alignkit.tracking.checkpoint import latest_checkpoint

__all__ = [
    "ENSEMBLE_FILE",
    "RewardEnsemble",
    "fit_stacking",
    "load_reward_source",
    "resolve_reward_model_dir",
]

ENSEMBLE_FILE = "ensemble.json"


def resolve_reward_model_dir(path: str | Path) -> Path:
    """A saved reward model directory, or a run directory's newest checkpoint's ``model``."""
    path = Path(path).expanduser()
    if (path / CONFIG_FILE).is_file():
        return path
    checkpoint = latest_checkpoint(path) if path.is_dir() else None
    if checkpoint is not None and (checkpoint / "model" / CONFIG_FILE).is_file():
        return checkpoint / "model"
    raise CheckpointError(
        f"{path}: not a reward/cost model (no {CONFIG_FILE}), a run directory with one, or an "
        f"ensemble run (no {ENSEMBLE_FILE})"
    )


def fit_stacking(margins: Tensor, steps: int = 200, l2: float = 1e-3) -> Tensor:
    """Stacking weights ``w [K]`` for pairs: minimise ``mean_i -log sigmoid(sum_k w_k d_ki)
    + l2 |w - 1/K|^2`` (the Bradley-Terry loss of the weighted margin; the bias of a linear
    head cancels in a difference), starting from the mean, with L-BFGS.

    ``margins [K, N]``: each member's ``r(chosen) - r(rejected)`` on held-out pairs.
    """
    margins = margins.detach().double()
    k = margins.shape[0]
    prior = torch.full((k,), 1.0 / k, dtype=torch.float64)
    weights = prior.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weights], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        combined = weights @ margins
        bt = reward_model_loss(combined, torch.zeros_like(combined), kind="bt").mean()
        loss = bt + l2 * (weights - prior).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach().float()


def _same_tokenizer(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a.get_vocab() == b.get_vocab())


class RewardEnsemble:
    """K reward or cost models scored together; see the module docstring."""

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        tokenizers: Sequence[Any],
        *,
        names: Sequence[str] | None = None,
        validation_accuracy: Sequence[float | None] | None = None,
        combination: str = "mean",
        penalty: float = 0.0,
        trim: float = 0.2,
        stacking: Sequence[float] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        if not models or len(models) != len(tokenizers):
            raise ConfigError("an ensemble needs one tokenizer per member and at least one member")
        kinds = {m.reward_config.kind for m in models}
        if len(kinds) != 1:
            raise ConfigError(f"an ensemble mixes reward and cost models: {sorted(kinds)}")
        if combination not in (*COMBINATIONS, "stacking"):
            raise ConfigError(
                f"combination must be one of {', '.join((*COMBINATIONS, 'stacking'))}"
            )
        self.models = list(models)
        self.kind = kinds.pop()
        self.names = list(names or [f"member-{i}" for i in range(len(models))])
        self.validation_accuracy = list(validation_accuracy or [None] * len(models))
        self.combination, self.penalty, self.trim = combination, penalty, trim
        self.stacking = None if stacking is None else torch.tensor(stacking, dtype=torch.float32)
        if combination == "stacking" and self.stacking is None:
            raise ConfigError("combination=stacking needs weights: fit them with fit_stacking")
        if combination == "weighted" and None in self.validation_accuracy:
            raise ConfigError("combination=weighted needs every member's validation accuracy")
        self.batch_size, self.max_length = batch_size, max_length
        # Members sharing a tokenizer share one tokenisation and one batch per input.
        self.groups: list[tuple[Any, list[int]]] = []
        for i, tokenizer in enumerate(tokenizers):
            for shared, members in self.groups:
                if _same_tokenizer(shared, tokenizer):
                    members.append(i)
                    break
            else:
                self.groups.append((tokenizer, [i]))
        self.name = f"{self.kind}_ensemble[{len(models)}]:{combination}"
        # called after each batch with (sequences scored, sequences in this call): progress bars
        self.on_progress: Callable[[int, int], None] | None = None

    def __len__(self) -> int:
        return len(self.models)

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def member_scores(self, prompts: Sequence[Any], responses: Sequence[str]) -> Tensor:
        """``[K, N]`` float32 scores of ``prompt + response`` (``models.reward.score_texts``)."""
        out = torch.empty(len(self.models), len(responses), dtype=torch.float32)
        for tokenizer, members in self.groups:
            out[members] = score_texts(
                lambda batch, members=members: torch.stack(
                    [reward_scores(self.models[k], batch) for k in members]
                ),
                tokenizer,
                prompts,
                responses,
                batch_size=self.batch_size,
                max_length=self.max_length,
                on_progress=self.on_progress,
            )
        return out

    def combine(self, scores: Tensor) -> Tensor:
        """``[K, N]`` -> ``[N]`` by this ensemble's combination."""
        if self.combination == "stacking":
            assert self.stacking is not None
            return self.stacking @ scores.float()
        weights = None
        if self.combination == "weighted":
            weights = torch.tensor(self.validation_accuracy, dtype=scores.dtype)
        return combine_rewards(scores, self.combination, weights, self.trim)

    def score_with_members(
        self, prompts: Sequence[Any], responses: Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        """``(penalised score [N], member scores [K, N])``."""
        scores = self.member_scores(prompts, responses)
        combined = self.combine(scores)
        if self.penalty and len(self) > 1:
            std = pair_uncertainty(scores, "std").float()
            combined = combined + (self.penalty if self.kind == "cost" else -self.penalty) * std
        return combined, scores

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> Tensor:
        """``[N]``: combined score minus ``penalty * std`` (plus, for a cost)."""
        return self.score_with_members(prompts, responses)[0]

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Tensor:
        return self.score(prompts, completions)


def load_reward_source(
    path: str | Path,
    *,
    combination: str = "mean",
    penalty: float = 0.0,
    trim: float = 0.2,
    device: torch.device | str | None = None,
    batch_size: int = 32,
) -> RewardEnsemble:
    """A reward/cost model or an ensemble run directory, as a ``RewardEnsemble``.

    ``combination="stacking"`` uses the weights stored in ``ensemble.json``.
    """
    path = Path(path).expanduser()
    if (path / ENSEMBLE_FILE).is_file():
        spec = json.loads((path / ENSEMBLE_FILE).read_text())
        members = spec["members"]
        directories = [path / m["checkpoint"] for m in members]
        names = [m["name"] for m in members]
        accuracy = [m.get("validation_accuracy") for m in members]
        stacking = spec.get("stacking")
    else:
        directories, names, accuracy, stacking = [resolve_reward_model_dir(path)], None, None, None
    models, tokenizers = [], []
    for directory in directories:
        model, tokenizer = load_reward_model(directory)
        models.append(model.to(device or "cpu").eval())
        tokenizers.append(tokenizer)
    return RewardEnsemble(
        models,
        tokenizers,
        names=names,
        validation_accuracy=accuracy,
        combination=combination,
        penalty=penalty,
        trim=trim,
        stacking=stacking,
        batch_size=batch_size,
    )
