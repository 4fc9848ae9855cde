"""`alignkit serve` answers OpenAI requests with the in-process engine's tokens, and llm_judge
talks real HTTP to it: the score contract, retries, timeouts, a server that is down, caching."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from launch_helpers import free_port

from alignkit.errors import ConfigError
from alignkit.models import load_policy
from alignkit.rollout import SamplingConfig, TransformersEngine, prompts_from_records
from alignkit.rollout.rewards import RewardFunctionError, build_reward_source
from alignkit.rollout.verifiers.judge import LLMJudge, parse_score
from alignkit.serving import ServedModel, background_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

NAME = "tiny-judge"
DIGIT = r"(\d)"  # the tiny model writes digits now and then: a pattern it can satisfy


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=3)


@pytest.fixture(scope="module")
def url(tiny):
    model, tokenizer = tiny
    with background_server(ServedModel(model, tokenizer, NAME, default_max_tokens=24)) as base:
        yield base


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _engine_text(tiny, prompt, max_new_tokens: int, seed: int = 0) -> str:
    model, tokenizer = tiny
    prompts = prompts_from_records([{"prompt": prompt}], tokenizer)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    generator = __import__("torch").Generator().manual_seed(seed)
    return (
        TransformersEngine(model, tokenizer)
        .generate(prompts, sampling, generator=generator)
        .completions[0]
    )


def test_health_and_models(url) -> None:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as response:
        assert json.loads(response.read()) == {"status": "ok"}
    with urllib.request.urlopen(url + "/models") as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == [NAME]


def test_completions_and_chat_return_the_engines_greedy_text(url, tiny) -> None:
    status, body = _post(
        url,
        "/completions",
        {"model": NAME, "prompt": "sort 312:", "max_tokens": 12, "temperature": 0},
    )
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == _engine_text(tiny, "sort 312:", 12)
    assert body["usage"]["completion_tokens"] <= 12
    messages = [{"role": "user", "content": "reverse 123"}]
    status, body = _post(
        url, "/chat/completions", {"model": NAME, "messages": messages, "temperature": 0}
    )
    assert status == 200
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": _engine_text(tiny, messages, 24),
    }
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_n_seed_and_stop(url) -> None:
    body = {"model": NAME, "prompt": ["a", "b"], "n": 2, "max_tokens": 8, "seed": 5}
    first, second = _post(url, "/completions", body)[1], _post(url, "/completions", body)[1]
    assert len(first["choices"]) == 4 and first["choices"] == second["choices"]
    text = first["choices"][0]["text"]
    if len(text) > 1:
        stopped = _post(url, "/completions", {**body, "stop": text[1]})[1]
        assert stopped["choices"][0]["text"] == text[: text.index(text[1])]
        assert stopped["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "other", "prompt": "x"}, 404, "does not exist"),
        ({"model": NAME, "prompt": "x", "stream": True}, 400, "'stream' is not supported"),
        ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"model": NAME, "prompt": "x", "mystery": 1}, 400, "unsupported request field"),
        ({"model": NAME, "prompt": "x", "max_tokens": 10_000}, 400, "maximum context length"),
        ({"model": NAME, "prompt": 3}, 400, "'prompt' must be"),
    ],
)
def test_bad_requests_get_openai_errors(url, body, status, message) -> None:
    code, answer = _post(url, "/completions", body)
    assert code == status and message in answer["error"]["message"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Score: 7", 0.7),
        ("On a scale of 0 to 10 ... score = 3.5\nScore: **9**", 0.9),
        ("score: 11", None),
        ("Score: -1", None),
        ("no verdict", None),
        ("Score: nan", None),
    ],
)
def test_score_contract(reply, expected) -> None:
    pattern = re.compile(r"(?i)score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?|nan)")
    assert parse_score(reply, pattern, 0, 10, normalize=True) == (
        None if expected is None else pytest.approx(expected)
    )
    assert parse_score("Score: 4", pattern, 0, 10, normalize=False) == 4.0


def test_judge_scores_the_servers_reply_through_its_template(url) -> None:
    sampling = {"max_tokens": 24, "temperature": 1.0, "seed": 0}
    judge = LLMJudge(
        url=url,
        score_pattern=DIGIT,
        min_score=0,
        max_score=9,
        template="Q: {prompt} A: {completion} gold {answer}",
        max_unparseable_fraction=1,
        **sampling,
    )
    assert judge.model == NAME  # asked from /v1/models
    prompts, completions, answers = (
        ["sort 312:", "sort 91:", "add 1 2:"],
        ["123", "19", "3"],
        ["123", "19", "3"],
    )
    scores = judge(prompts, completions, answer=answers)
    assert any(s is not None for s in scores)  # seed 0 makes the tiny model write digits
    for prompt, completion, answer, score in zip(
        prompts, completions, answers, scores, strict=True
    ):
        messages = [{"role": "user", "content": f"Q: {prompt} A: {completion} gold {answer}"}]
        reply = _post(url, "/chat/completions", {"model": NAME, "messages": messages, **sampling})[
            1
        ]
        digits = re.findall(DIGIT, reply["choices"][0]["message"]["content"])
        assert score == (pytest.approx(int(digits[-1]) / 9) if digits else None)


def test_unparseable_replies_follow_the_documented_rule(url) -> None:
    never = r"(NEVER-\d)"
    lenient = LLMJudge(
        url=url, model=NAME, score_pattern=never, max_tokens=4, max_unparseable_fraction=1
    )
    assert lenient(["p", "q"], ["a", "b"]) == [None, None]
    source = build_reward_source(
        [
            {
                "function": "llm_judge",
                "options": {"url": url, "model": NAME, "score_pattern": never, "max_tokens": 4},
            }
        ]
    )
    with pytest.raises(
        RewardFunctionError,
        match=r"(?s)2 of 2 replies have no score.*sample 0's reply.*prompt: 'p'",
    ):
        source(["p", "q"], ["a", "b"], [{}, {}])
    strict = LLMJudge(
        url=url, model=NAME, score_pattern=never, max_tokens=4, on_unparseable="error"
    )
    with pytest.raises(RewardFunctionError, match="1 of 1 replies have no score"):
        strict(["p"], ["a"])


def test_timeout_and_server_down_are_errors_naming_the_sample(url) -> None:
    # No reply of 150 new tokens (tokenising, a prefill, 150 decode steps, JSON) comes back
    # within 1 ms: every try times out. (50 ms was not enough: the tiny model's lean decoder
    # answered in time once on a quiet machine, and the test failed on the unparsed reply.)
    slow = LLMJudge(
        url=url, model=NAME, template="{completion}", max_tokens=150, timeout=0.001, max_retries=1
    )
    with pytest.raises(
        RewardFunctionError,
        match=r"(?s)sample 0: POST .*failed 2 times, last: .*(timed out|Timeout).*prompt: 'p'",
    ):
        slow(["p"], ["a"])
    port = free_port()
    down = LLMJudge(url=f"http://127.0.0.1:{port}", model=NAME, max_retries=2)
    assert down.url == f"http://127.0.0.1:{port}/v1"
    with pytest.raises(
        RewardFunctionError, match=r"(?s)failed 3 times, last: ConnectionRefusedError"
    ):
        down(["p"], ["a"])
    with pytest.raises(ConfigError, match=r"set options\.model or start the server"):
        LLMJudge(url=f"http://127.0.0.1:{port}", max_retries=0)
    wrong = LLMJudge(url=url, model="no-such-model", max_retries=3)
    with pytest.raises(RewardFunctionError, match=r"HTTP 404.*does not exist"):
        wrong(["p"], ["a"])


def test_cache_answers_repeats_after_the_server_is_gone(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    options = {
        "model": NAME,
        "score_pattern": DIGIT,
        "max_score": 9,
        "max_tokens": 8,
        "max_unparseable_fraction": 1,
        "cache_file": str(tmp_path / "judge.sqlite"),
    }
    with background_server(ServedModel(model, tokenizer, NAME)) as base:
        first = LLMJudge(url=base, **options)(["p", "q"], ["a", "b"])
    # The server is down now: only the SQLite file can answer.
    again = LLMJudge(url=base, max_retries=0, **options)
    assert again(["p", "q"], ["a", "b"]) == first
    with pytest.raises(RewardFunctionError, match="ConnectionRefusedError"):
        again(["r"], ["c"])


def test_template_errors_and_bad_options(url) -> None:
    judge = LLMJudge(url=url, model=NAME, template="{prompt} {missing}")
    with pytest.raises(ConfigError, match="template field 'missing'"):
        judge(["p"], ["a"])
    with pytest.raises(ConfigError, match="exactly one group"):
        build_reward_source(
            [
                {
                    "function": "llm_judge",
                    "options": {"url": url, "model": NAME, "score_pattern": r"\d"},
                }
            ]
        )
    with pytest.raises(ConfigError, match="url must be"):
        build_reward_source(
            [{"function": "llm_judge", "options": {"url": "localhost:8000", "model": NAME}}]
        )
