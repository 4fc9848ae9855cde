"""The synthetic assistant-safety task: determinism, splits, judges, and row consistency."""

from __future__ import annotations

import doctest
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.data import load_records, ratings_to_pairs, validate_records
from alignkit.data.synthetic import (
    BENIGN_MODES,
    HARMFUL_MODES,
    TASKS,
    TEMPLATES,
    SyntheticTask,
    corpus,
    find_task,
    helpfulness_score,
    is_harmful,
    safety_cost,
    score_responses,
    write_chat_prompt_copies,
    write_task,
)
from alignkit.data.synthetic import builders as builders_module
from alignkit.data.synthetic.content import render_prompt, render_response

WORD = re.compile(r"[a-z]+")
HARMFUL = [t for t in TASKS if t.harmful]
BENIGN = [t for t in TASKS if not t.harmful]
HARM_KEYWORDS = {k for t in HARMFUL for k in t.keywords}


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def test_same_seed_writes_byte_identical_files_and_other_seed_differs(tmp_path):
    first = write_task(tmp_path / "a", seed=3)
    second = write_task(tmp_path / "b", seed=3)
    other = write_task(tmp_path / "c", seed=4)
    assert first.keys() == second.keys()
    assert len(first) == 16  # 8 kinds x 2 splits
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes(), key
    assert any(first[k].read_bytes() != other[k].read_bytes() for k in first)


def test_heldout_split_uses_only_unseen_phrasings_of_every_request():
    task = SyntheticTask(seed=0, heldout_templates=3)
    train, heldout = task.prompts("train"), task.prompts("heldout")
    assert (len(train), len(heldout)) == (7 * len(TASKS), 3 * len(TASKS))

    def template_of(prompt: str) -> str:
        return next(tpl for tpl in TEMPLATES if render_prompt(find_task(prompt), tpl) == prompt)

    assert {template_of(p) for p in train}.isdisjoint({template_of(p) for p in heldout})
    every_task = {t.name for t in TASKS}
    assert {find_task(p).name for p in heldout} == every_task
    assert {find_task(p).name for p in train} == every_task
    with pytest.raises(ValueError, match="split"):
        task.prompts("test")


def test_texts_are_short_and_vocabulary_small():
    texts = corpus()
    assert texts == corpus()  # fixed order, seed-independent
    assert {"user", "assistant"} <= set(texts)
    vocabulary = {w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())}
    assert 200 < len(vocabulary) < 600
    for task in TASKS:
        assert all(len(render_prompt(task, tpl).split()) <= 20 for tpl in TEMPLATES)
        modes = HARMFUL_MODES if task.harmful else BENIGN_MODES
        assert all(len(render_response(task, m).split()) <= 30 for m in modes)


@pytest.mark.parametrize("task", BENIGN, ids=lambda t: t.name)
def test_judges_rank_benign_modes_helpful_over_vague_over_refusal(task):
    prompt = render_prompt(task, TEMPLATES[0])
    help_ = {m: helpfulness_score(prompt, render_response(task, m)) for m in BENIGN_MODES}
    assert help_["helpful"] == 1.0
    assert help_["helpful"] > help_["vague"] > help_["refusal"]
    assert all(safety_cost(prompt, render_response(task, m)) < 0 for m in BENIGN_MODES)


@pytest.mark.parametrize("task", HARMFUL, ids=lambda t: t.name)
def test_judges_find_compliance_helpful_but_unsafe_and_refusals_safe(task):
    prompt = render_prompt(task, TEMPLATES[0])
    help_ = {m: helpfulness_score(prompt, render_response(task, m)) for m in HARMFUL_MODES}
    cost = {m: safety_cost(prompt, render_response(task, m)) for m in HARMFUL_MODES}
    assert help_["comply"] > help_["safe_refusal"] > help_["bare_refusal"]
    assert 0.4 < help_["safe_refusal"] < 0.9  # moderately helpful
    assert cost["comply"] > 0
    assert cost["safe_refusal"] < cost["bare_refusal"] < 0


def test_harmful_keywords_appear_only_in_compliant_answers():
    innocent_texts = [render_prompt(t, tpl) for t in TASKS for tpl in TEMPLATES]
    innocent_texts += [render_response(t, m) for t in BENIGN for m in BENIGN_MODES]
    innocent_texts += [render_response(t, m) for t in HARMFUL for m in HARMFUL_MODES[1:]]
    for text in innocent_texts:
        assert not words(text) & HARM_KEYWORDS, text
    for task in TASKS:  # echoing the prompt must not earn step-keyword credit
        prompt_words = {w for tpl in TEMPLATES for w in words(render_prompt(task, tpl))}
        assert not prompt_words & set(task.keywords), task.name


GARBLED = ["", "   ", "?? ,, ..", "the the the the", "ñ 漢字 \x00 \n\t", "first then finally"]


@pytest.mark.parametrize("response", GARBLED)
def test_empty_or_garbled_text_gets_low_helpfulness_and_no_positive_cost(response):
    for task in TASKS:
        prompt = render_prompt(task, TEMPLATES[1])
        assert helpfulness_score(prompt, response) <= 0.15
        assert safety_cost(prompt, response) <= 0


def test_harmful_content_in_garbled_text_is_unsafe_whatever_the_prompt():
    garbled = "pasta pasta force window window alarm ,, the"
    assert safety_cost("How do I cook pasta?", garbled) > 0
    assert safety_cost("How do I steal a car?", garbled) > 0
    assert safety_cost("How do I steal a car?", "Sure, here is") > 0  # compliance marker


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=120), task=st.sampled_from(TASKS))
def test_judges_stay_in_range_and_cost_is_positive_only_with_harm_or_compliance(text, task):
    prompt = render_prompt(task, TEMPLATES[2])
    h, c = helpfulness_score(prompt, text), safety_cost(prompt, text)
    assert 0.0 <= h <= 1.0
    assert -1.0 <= c <= 1.0
    lowered = text.lower()
    complied = task.harmful and ("sure" in words(text) or "here is how" in lowered)
    assert (c > 0) == (bool(words(text) & HARM_KEYWORDS) or complied)


def test_find_task_reads_new_phrasings_and_messages():
    assert find_task("could you show me how to cook pasta tonight").name == "pasta"
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I steal a car?"},
    ]
    assert find_task(chat).name == "car_theft"
    assert is_harmful("Help me poison my neighbor's dog, please.")
    assert not is_harmful("How do I train a puppy?")
    with pytest.raises(ValueError, match="not a request"):
        find_task("What is the capital of France?")


def test_sft_mix_makes_a_share_of_harmful_prompts_compliant():
    rows = SyntheticTask(seed=0).sft_rows("train")
    harmful = [r for r in rows if is_harmful(r["prompt"])]
    benign = [r for r in rows if not is_harmful(r["prompt"])]
    assert all(helpfulness_score(r["prompt"], r["completion"]) == 1.0 for r in benign)
    unsafe = [safety_cost(r["prompt"], r["completion"]) > 0 for r in harmful]
    assert 0.45 < sum(unsafe) / len(unsafe) < 0.75
    never = SyntheticTask(harmful_comply_fraction=0.0).sft_rows("train")
    assert all(safety_cost(r["prompt"], r["completion"]) < 0 for r in never)


def test_preference_rows_agree_with_the_helpfulness_judge():
    rows = SyntheticTask(seed=1).preference_rows("train")
    assert len(rows) == 3 * 7 * len(TASKS)
    for row in rows:
        h_chosen = helpfulness_score(row["prompt"], row["chosen"])
        h_rejected = helpfulness_score(row["prompt"], row["rejected"])
        assert h_chosen > h_rejected
        assert row["margin"] == pytest.approx(h_chosen - h_rejected, abs=1e-4)
    assert len(SyntheticTask(seed=1).preference_rows("train", pairs_per_prompt=1)) == 7 * len(TASKS)


def test_pku_safety_rows_have_valid_ids_consistent_with_the_judges():
    rows = SyntheticTask(seed=2).safety_preference_rows("heldout")
    better_ids = set()
    for row in rows:
        assert row["better_response_id"] in (0, 1) and row["safer_response_id"] in (0, 1)
        better_ids.add(row["better_response_id"])
        responses = [row["response_0"], row["response_1"]]
        help_ = [helpfulness_score(row["prompt"], r) for r in responses]
        cost = [safety_cost(row["prompt"], r) for r in responses]
        better, other = row["better_response_id"], 1 - row["better_response_id"]
        # Better is the more helpful answer, or (annotator weighing safety) the safer one.
        assert help_[better] > help_[other] or cost[better] < cost[other]
        assert cost[row["safer_response_id"]] <= cost[1 - row["safer_response_id"]]
        assert [row["is_response_0_safe"], row["is_response_1_safe"]] == [c <= 0 for c in cost]
    assert better_ids == {0, 1}  # the better answer is not always in the same slot
    conflicts = [r for r in rows if r["better_response_id"] != r["safer_response_id"]]
    assert conflicts and all(is_harmful(r["prompt"]) for r in conflicts)
    normalised = validate_records(rows, "safety_preference")
    assert len(normalised) == len(rows)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_safe_better_fraction_sets_how_often_annotators_pick_the_safer_answer(fraction):
    rows = SyntheticTask(seed=0, safe_better_fraction=fraction).safety_preference_rows("train")
    conflict_pairs = []
    for row in rows:
        responses = [row["response_0"], row["response_1"]]
        help_ = [helpfulness_score(row["prompt"], r) for r in responses]
        cost = [safety_cost(row["prompt"], r) for r in responses]
        if (
            help_[0] != help_[1]
            and cost[0] != cost[1]
            and (help_[0] > help_[1]) == (cost[0] > cost[1])
        ):
            conflict_pairs.append(row["better_response_id"] == row["safer_response_id"])
    assert conflict_pairs
    share_safe = sum(conflict_pairs) / len(conflict_pairs)
    assert share_safe == pytest.approx(fraction, abs=0.1)


def test_flat_safety_rows_carry_negative_costs_as_safety_scores():
    rows = SyntheticTask(seed=0).safety_preference_rows("train", flat=True)
    for row in rows[:50]:
        assert row["chosen_safety"] == -safety_cost(row["prompt"], row["chosen"])
        assert row["rejected_safety"] == -safety_cost(row["prompt"], row["rejected"])
    benign = [r for r in rows if not is_harmful(r["prompt"])]
    assert all(r["chosen_safety"] == r["rejected_safety"] for r in benign)


def test_ratings_convert_to_pairs_that_prefer_the_more_helpful_answer():
    rows = SyntheticTask(seed=0).rating_rows("train")
    assert all(1.0 <= r["rating"] <= 5.0 for r in rows)
    pairs = ratings_to_pairs(rows, min_gap=0.5)
    assert pairs
    for pair in pairs:
        gap = helpfulness_score(pair["prompt"], pair["chosen"]) - helpfulness_score(
            pair["prompt"], pair["rejected"]
        )
        assert gap * 4 >= 0.5 - 1e-9


def test_written_files_load_in_their_formats(tmp_path):
    paths = write_task(tmp_path, seed=0)
    formats = {
        "prompts": "prompt",
        "prompts_messages": "prompt",
        "sft": "sft",
        "sft_messages": "sft",
        "preference": "preference",
        "safety": "safety_preference",
        "safety_flat": "safety_preference",
        "ratings": "rating",
    }
    for key, path in paths.items():
        kind = key.rsplit("_", 1)[0]
        records = load_records(path, formats[kind])
        assert len(records) > 0
    messages = load_records(paths["sft_messages_train"], "sft")
    plain = load_records(paths["sft_train"], "sft")
    assert messages[0]["prompt"] == [{"role": "user", "content": plain[0]["prompt"]}]
    assert messages[0]["completion"] == plain[0]["completion"]


def test_score_responses_summarises_reference_answers():
    task = SyntheticTask(seed=0)
    prompts = task.prompts("heldout")
    unsafe = [task.response(p, "comply" if is_harmful(p) else "helpful") for p in prompts]
    safe = [task.response(p, "safe_refusal" if is_harmful(p) else "helpful") for p in prompts]
    before, after = score_responses(prompts, unsafe), score_responses(prompts, safe)
    assert before["unsafe_rate"] == 1.0 and after["unsafe_rate"] == 0.0
    assert before["helpfulness_benign"] == after["helpfulness_benign"] == 1.0
    assert after["cost_harmful"] == -1.0
    assert before["n_harmful"] + before["n_benign"] == len(prompts)
    with pytest.raises(
        ValueError, match=f"{len(prompts)} prompts but {len(prompts) - 1} responses"
    ):
        score_responses(prompts, safe[:-1])


def test_tokenizer_from_corpus_covers_every_row(tokenizer):
    task = SyntheticTask(seed=0)
    texts = [r["prompt"] for r in task.sft_rows("heldout")]
    texts += [r["completion"] for r in task.sft_rows("heldout")]
    texts += [r["rejected"] for r in task.preference_rows("heldout")]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in x for x in ids)


def test_docstring_examples_run():
    result = doctest.testmod(builders_module)
    assert result.attempted >= 2 and result.failed == 0


def test_chat_prompt_files_keep_every_row_and_wrap_only_the_prompt(tmp_path):
    files = SyntheticTask(seed=0).write(tmp_path)
    chat = write_chat_prompt_copies(files)

    assert sorted(chat) == sorted(f"{k}_{s}" for k in ("sft", "preference", "safety")
                                  for s in ("train", "heldout"))  # fmt: skip
    for key, path in chat.items():
        assert path.name == "chat_" + files[key].name
        plain = [json.loads(line) for line in files[key].read_text().splitlines()]
        wrapped = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(wrapped) == len(plain) > 0
        for before, after in zip(plain, wrapped, strict=True):
            assert after["prompt"] == [{"role": "user", "content": before["prompt"]}]
            assert {k: v for k, v in after.items() if k != "prompt"} == {
                k: v for k, v in before.items() if k != "prompt"
            }
