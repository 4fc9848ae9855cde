"""Where each TRL (1.16) option went: the one mapping behind the config loader's hints
(``beta=0.04`` in a GRPO run: "did you mean 'kl.coef'?") and the table of
``docs/migrating-from-trl.md`` (:func:`markdown_table` writes it; a test keeps the two equal).

An option maps to one alignkit key per family of methods where the key differs (TRL's ``beta`` is
``dpo.beta`` in the DPO family and ``kl.coef`` in online RL); the loader suggests the first key
that the config being loaded has. An option alignkit does not offer says what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Families of methods, as the migration table names them.
SCOPES = {
    "all": "other methods",
    "offline": "offline trainers",
    "dpo": "DPO family",
    "online": "online-RL methods",
}


@dataclass(frozen=True)
class Target:
    """The alignkit key of a TRL option in one family of methods."""

    key: str
    scope: str = "all"
    note: str = ""


@dataclass(frozen=True)
class TrlOption:
    """One TRL option (and other common spellings of it) and where it went."""

    name: str
    targets: tuple[Target, ...] = ()
    instead: str = ""  # when no key of the config fits: what to do instead
    aliases: tuple[str, ...] = ()  # spellings that are not TRL's, hinted the same way

    def target_for(self, keys: set[str] | list[str]) -> Target | None:
        """The first target whose key the config has, or None."""
        return next((t for t in self.targets if t.key in keys), None)


def _to(key: str, note: str = "") -> tuple[Target, ...]:
    """The same key in every method."""
    return (Target(key, "all", note),)


_PER_COMPLETION = (
    "TRL counts completions; alignkit counts prompts in rollout.prompts_per_iteration and "
    "sequences in train.sequences_per_*"
)

TRL_OPTIONS: tuple[TrlOption, ...] = (
    # ---- TrainingArguments, every trainer
    TrlOption("learning_rate", _to("optim.lr"), aliases=("lr",)),
    TrlOption("lr_scheduler_type", _to("optim.schedule", "linear, cosine or constant")),
    TrlOption("warmup_ratio", _to("optim.warmup_ratio")),
    TrlOption("warmup_steps", _to("optim.warmup_steps")),
    TrlOption("weight_decay", _to("optim.weight_decay", "AdamW, matrices only")),
    TrlOption("adam_beta1", _to("optim.betas", "a pair: [beta1, beta2]")),
    TrlOption("adam_beta2", _to("optim.betas", "a pair: [beta1, beta2]")),
    TrlOption("adam_epsilon", _to("optim.eps")),
    TrlOption(
        "max_grad_norm",
        _to(
            "optim.max_grad_norm",
            "a step whose norm is not finite is skipped and counted (skipped_steps)",
        ),
    ),
    TrlOption(
        "num_train_epochs",
        (
            Target("epochs", "offline"),
            Target(
                "train.iterations",
                "online",
                "an online run counts iterations of rollout.prompts_per_iteration prompts",
            ),
        ),
    ),
    TrlOption(
        "max_steps",
        (
            Target("max_steps", "offline"),
            Target(
                "train.iterations",
                "online",
                "one iteration = one generation batch; its mini-batches are the optimizer steps",
            ),
        ),
    ),
    TrlOption(
        "per_device_train_batch_size",
        (
            Target("examples_per_device", "offline", "rows; for DPO and reward models, pairs"),
            Target("train.sequences_per_device", "online", _PER_COMPLETION),
        ),
        aliases=("train_batch_size", "batch_size"),
    ),
    TrlOption("per_device_eval_batch_size", _to("eval.examples_per_device")),
    TrlOption(
        "gradient_accumulation_steps",
        (
            Target("grad_accum_steps", "offline"),
            Target(
                "train.sequences_per_minibatch",
                "online",
                "sequences per optimizer step; micro-batches of train.sequences_per_device "
                "are accumulated under it",
            ),
        ),
    ),
    TrlOption("bf16", _to("precision", "precision: bf16 (auto, the default, picks it where fast)")),
    TrlOption("fp16", _to("precision", "fp32 or bf16; no fp16")),
    TrlOption("gradient_checkpointing", _to("gradient_checkpointing", "off by default")),
    TrlOption("dataloader_num_workers", _to("dataloader_workers")),
    TrlOption("eval_steps", _to("eval.every")),
    TrlOption("logging_steps", _to("logging.every")),
    TrlOption("save_steps", _to("checkpoint.every")),
    TrlOption("save_total_limit", _to("checkpoint.keep_last")),
    TrlOption("report_to", _to("logging.report_to", "[jsonl, tensorboard, wandb]")),
    TrlOption("output_dir", _to("output_dir", "the run directory is <output_dir>/<run_name>")),
    TrlOption(
        "resume_from_checkpoint",
        _to("resume_from", "or `alignkit train <method> --resume runs/<name>`; exact"),
    ),
    TrlOption(
        "max_length",
        (
            Target("data.max_length", "offline"),
            Target(
                "data.max_prompt_length",
                "online",
                "prompt tokens; the completion's are rollout.max_new_tokens",
            ),
        ),
        aliases=("max_seq_length",),
    ),
    TrlOption(
        "disable_dropout",
        instead="online RL always switches dropout off in the policy (and critic)",
    ),
    TrlOption(
        "push_to_hub",
        instead="not offered: checkpoints/step-N/model is a Hugging Face folder (`hf upload`)",
    ),
    # ---- ModelConfig and peft
    TrlOption("model_name_or_path", _to("model.name")),
    TrlOption("dtype", _to("model.dtype"), aliases=("torch_dtype",)),
    TrlOption(
        "use_peft", _to("model.lora", "model.lora: {r: 8, alpha: 16} turns LoRA on; null: off")
    ),
    TrlOption(
        "peft_config",
        _to(
            "model.lora",
            "{r, alpha, dropout, target_modules}; the reference is then the policy with its "
            "adapter off",
        ),
    ),
    TrlOption("lora_r", _to("model.lora.r")),
    TrlOption("lora_alpha", _to("model.lora.alpha")),
    TrlOption("lora_dropout", _to("model.lora.dropout")),
    TrlOption("lora_target_modules", _to("model.lora.target_modules")),
    # ---- SFT
    TrlOption("padding_free", _to("model.packed", "on by default")),
    TrlOption(
        "completion_only_loss",
        instead="always on: only completion (assistant) tokens are trained",
    ),
    TrlOption("assistant_only_loss", _to("data.assistant_turns", "all or last")),
    # ---- DPO
    TrlOption(
        "beta",
        (
            Target("dpo.beta", "dpo"),
            Target(
                "kl.coef",
                "online",
                "TRL 1.16 puts the bias-corrected k3 in the loss: kl.placement=loss "
                "kl.estimator=k3+ reproduce it (value and gradient); alignkit's default puts "
                "k1 in the reward",
            ),
        ),
    ),
    TrlOption(
        "loss_type",
        (
            Target("dpo.kind", "dpo", "sigmoid, ipo, hinge, robust, simpo, orpo, ..."),
            Target(
                "policy_loss.agg",
                "online",
                "grpo -> seq-mean-token-mean, dapo/bnpo -> token-mean, "
                "dr_grpo -> seq-mean-token-sum-norm; normalised over the whole optimizer step; "
                "cispo and sapo are policy_loss.name",
            ),
        ),
    ),
    TrlOption(
        "label_smoothing",
        (Target("dpo.label_smoothing", "dpo", "applied with sigmoid too (cDPO); TRL ignores it"),),
    ),
    TrlOption("rpo_alpha", (Target("dpo.nll_weight", "dpo", "per-pair mean NLL"),)),
    TrlOption("cpo_alpha", (Target("dpo.nll_weight", "dpo"),)),
    TrlOption("simpo_gamma", (Target("dpo.simpo_gamma", "dpo"),)),
    TrlOption("ref_model", _to("reference", "null: the initial policy")),
    TrlOption(
        "precompute_ref_log_probs",
        instead="always on: reference log-probs are computed once and cached in the run",
    ),
    TrlOption("center_rewards_coefficient", instead="not offered"),
    # ---- GRPO / RLOO / PPO
    TrlOption(
        "num_generations",
        (Target("rollout.samples_per_prompt", "online", "the group of each prompt"),),
    ),
    TrlOption(
        "generation_batch_size",
        (Target("rollout.prompts_per_iteration", "online", _PER_COMPLETION),),
    ),
    TrlOption(
        "steps_per_generation",
        (
            Target(
                "train.sequences_per_minibatch",
                "online",
                "an iteration's sequences / steps_per_generation; each mini-batch is one "
                "optimizer step",
            ),
        ),
    ),
    TrlOption("num_iterations", (Target("train.epochs_per_iteration", "online"),)),
    TrlOption("num_ppo_epochs", (Target("train.epochs_per_iteration", "online"),)),
    TrlOption("max_completion_length", (Target("rollout.max_new_tokens", "online"),)),
    TrlOption("response_length", (Target("rollout.max_new_tokens", "online"),)),
    TrlOption(
        "temperature",
        (
            Target(
                "rollout.temperature",
                "online",
                "the training forward divides the logits by it too",
            ),
        ),
    ),
    TrlOption("top_p", (Target("rollout.top_p", "online"),)),
    TrlOption("top_k", (Target("rollout.top_k", "online"),)),
    TrlOption("epsilon", (Target("policy_loss.clip_ratio", "online"),), aliases=("cliprange",)),
    TrlOption("epsilon_high", (Target("policy_loss.clip_ratio_high", "online"),)),
    TrlOption(
        "delta",
        (Target("policy_loss.delta", "online", "two-sided clip; dual_clip is the one-sided form"),),
    ),
    TrlOption("entropy_coef", (Target("policy_loss.entropy_coef", "online"),)),
    TrlOption(
        "scale_rewards",
        (Target("advantage.scale_rewards", "online", "group, batch or none, as TRL"),),
        aliases=("std_scaling",),
    ),
    TrlOption(
        "normalize_advantages",
        (Target("advantage.normalize", "online", "RLOO (advantage.estimator: rloo)"),),
    ),
    TrlOption(
        "sapo_temperature_pos", (Target("policy_loss.tau_pos", "online", "policy_loss.name: sapo"),)
    ),
    TrlOption(
        "sapo_temperature_neg", (Target("policy_loss.tau_neg", "online", "policy_loss.name: sapo"),)
    ),
    TrlOption(
        "top_entropy_quantile",
        (
            Target(
                "policy_loss.top_entropy_quantile",
                "online",
                "the quantile spans the whole optimizer step (TRL: each micro-batch)",
            ),
        ),
    ),
    TrlOption(
        "off_policy_mask_threshold", (Target("policy_loss.off_policy_mask_threshold", "online"),)
    ),
    TrlOption(
        "reward_funcs",
        (
            Target(
                "rewards",
                "online",
                "[{function: path/to/file.py:fn}, {model: runs/rm}]; see the README's "
                "'Writing a reward function'",
            ),
        ),
    ),
    TrlOption(
        "reward_weights",
        (Target("rewards", "online", "a weight per source: [{function: ..., weight: 0.5}]"),),
    ),
    TrlOption("kl_coef", (Target("kl.coef", "online"),)),
    TrlOption("cliprange_value", (Target("critic.value_clip", "online"),)),
    TrlOption("vf_coef", (Target("critic.coef", "online"),)),
    TrlOption("gamma", (Target("advantage.gamma", "online"),)),
    TrlOption("lam", (Target("advantage.lam", "online"),)),
    TrlOption("log_completions", (Target("train.samples_every", "online"),)),
    TrlOption(
        "use_vllm",
        (
            Target(
                "rollout.engine",
                "online",
                "rollout.engine: vllm; servers run in vLLM's own venv, settings in rollout.vllm "
                "(docs/vllm.md)",
            ),
        ),
    ),
    TrlOption("vllm_server_base_url", (Target("rollout.vllm.urls", "online", "a list"),)),
    TrlOption(
        "vllm_importance_sampling_mode",
        (
            Target(
                "rollout.correction.mode",
                "online",
                "token_truncate = level token + mode truncate; sequence_mask (TRL's default) = "
                "level sequence + mode mask",
            ),
        ),
    ),
    TrlOption(
        "vllm_importance_sampling_clip_max",
        (Target("rollout.correction.cap", "online", "formerly rollout.max_importance_weight"),),
        aliases=("vllm_importance_sampling_cap", "max_importance_weight"),
    ),
    TrlOption(
        "vllm_importance_sampling_clip_min",
        (Target("rollout.correction.lower", "online", "mode mask only"),),
    ),
    TrlOption(
        "vllm_importance_sampling_correction",
        instead="always on when rollouts are not the trainer's own distribution (vLLM, top_k/"
        "top_p, a teacher); rollout.correction sets how",
    ),
    TrlOption(
        "mask_truncated_completions",
        (Target("policy_loss.mask_truncated_completions", "online"),),
    ),
    TrlOption(
        "importance_sampling_level",
        (
            Target(
                "policy_loss.name",
                "online",
                "sequence -> gspo (sequence_token -> gspo_token); token is ppo_clip",
            ),
        ),
    ),
)

#: Every TRL name and alias -> its option.
BY_NAME: dict[str, TrlOption] = {
    name: option for option in TRL_OPTIONS for name in (option.name, *option.aliases)
}


def trl_hint(name: str, keys: set[str] | list[str], config_name: str) -> str | None:
    """The hint for an unknown key that is a TRL option (or a misspelling of one), given the
    keys of the config being loaded: "did you mean 'kl.coef'? <note>", or where the option
    lives in other methods, or what to do instead; None when `name` is no TRL option."""
    import difflib

    leaf = name.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(BY_NAME), n=1, cutoff=0.85)
    if not close:
        return None
    option = BY_NAME[close[0]]
    target = option.target_for(keys)
    if target is not None:
        if target.key == name:
            return None
        note = f" {target.note}" if target.note else ""
        return f"did you mean '{target.key}'?{note}"
    if close[0] != leaf:
        return None  # a misspelling of an option this config lacks: spelling hints do better
    if option.targets:
        where = " or ".join(f"{t.key} of the {SCOPES[t.scope]}" for t in option.targets)
        where = where.replace("of the other methods", "in other methods")
        return f"TRL's '{leaf}' is {where}; {config_name} has no such setting"
    return f"TRL's '{leaf}': {option.instead}"


def markdown_table() -> str:
    """The table of docs/migrating-from-trl.md, "Where each TRL option went"."""
    rows = ["| TRL (1.16) | alignkit | note |", "|---|---|---|"]
    for option in TRL_OPTIONS:
        if option.targets:
            keys = "; ".join(
                f"`{t.key}`" + (f" ({SCOPES[t.scope]})" if t.scope != "all" else "")
                for t in option.targets
            )
            many = len(option.targets) > 1
            notes = "; ".join(
                (f"{SCOPES[t.scope]}: " if many else "") + t.note for t in option.targets if t.note
            )
        else:
            keys, notes = "-", option.instead
        rows.append(f"| `{option.name}` | {keys} | {notes} |")
    return "\n".join(rows) + "\n"
