"""``llm_judge``: a score from a judge model behind an OpenAI-compatible endpoint.

Each completion is put into ``template`` (``str.format`` fields: ``{prompt}``, ``{completion}``,
``{min_score}``, ``{max_score}`` and any column of the row, e.g. ``{answer}``), sent to
``{url}/chat/completions`` as one user message (after ``system``, when given) or, with
``api: completions``, to ``{url}/completions`` as the prompt. ``url`` is the server's OpenAI base
URL (``http://host:8000/v1``; a URL without a path gets ``/v1``). ``model``: the name to send
(default: the first one ``{url}/models`` lists, asked once when the source is built).

Score contract (``parse_score``): the reply's text is searched for ``score_pattern`` (a regular
expression with exactly one group: a number); the LAST match counts (a judge often restates the
scale before its verdict). The number must be finite and in ``[min_score, max_score]``; the score
is ``(s - min_score) / (max_score - min_score)`` in [0, 1] (``normalize: false``: ``s`` itself).
A reply with no such number (none, or out of range) is *unparseable*: with ``on_unparseable:
none`` (default) its score is None (not applicable: left out of its group's statistics), with
``error`` it stops training with an error naming the source, the sample and the reply. Either
way, a batch where more than ``max_unparseable_fraction`` of the replies are unparseable is an
error (a judge that mostly fails is misconfigured).

Transport: each request has ``timeout`` seconds per connect and per read; a refused
connection, a timeout, HTTP 408, 429 or 5xx is retried up to ``max_retries`` times (waits 0.5 s, 1 s,
2 s, ..., at most 8 s), then is an error naming the source, the sample and the URL; any other
HTTP error (a wrong model name, a bad request) is an error at once, with the server's message.
Sampling: ``temperature`` (default 0), ``max_tokens``, ``seed`` (sent when given, for
reproducible sampled verdicts). Requests of a batch run ``concurrency`` at a time. Replies are cached in memory by request (and
in ``cache_file``, an SQLite file, across runs when given): with ``temperature > 0`` a repeated
request gets the cached reply (``cache: false`` asks again). An API key is read from the
environment variable named by ``api_key_env`` (never from the config).
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from alignkit.errors import ConfigError
from alignkit.rollout.registry import (
    RewardFunctionError,
    completion_text,
    describe_sample,
    prompt_text,
    register_reward,
    row_columns,
)

__all__ = ["DEFAULT_SCORE_PATTERN", "DEFAULT_TEMPLATE", "JudgeError", "LLMJudge", "parse_score"]

DEFAULT_TEMPLATE = (
    "Rate how well the response answers the prompt, from {min_score} (useless or wrong) to "
    "{max_score} (excellent).\n\nPrompt:\n{prompt}\n\nResponse:\n{completion}\n\n"
    "End your reply with a line 'Score: <number>'."
)
DEFAULT_SCORE_PATTERN = r"(?i)score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)"


class JudgeError(RewardFunctionError):
    """The judge could not score a sample (server unreachable, an HTTP error, an unparseable
    reply under ``on_unparseable: error``). Exit code 2."""


def parse_score(
    reply: str, pattern: re.Pattern[str], min_score: float, max_score: float, normalize: bool
) -> float | None:
    """The score in ``reply`` under the contract of the module docstring; None = unparseable."""
    matches = pattern.findall(reply)
    if not matches:
        return None
    try:
        value = float(matches[-1])
    except ValueError:
        return None
    if not math.isfinite(value) or not min_score <= value <= max_score:
        return None
    return (value - min_score) / (max_score - min_score) if normalize else value


class _Cache:
    """Replies by request key, in memory and optionally in an SQLite file (thread-safe)."""

    def __init__(self, path: str | None) -> None:
        self._memory: dict[str, str] = {}
        self._lock = threading.Lock()
        self._db = None
        if path:
            self._db = sqlite3.connect(path, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT)"
            )
            self._db.commit()

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._memory or self._db is None:
                return self._memory.get(key)
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self._memory[key] = row[0]
            return None if row is None else row[0]

    def put(self, key: str, reply: str) -> None:
        with self._lock:
            self._memory[key] = reply
            if self._db is not None:
                self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, reply))
                self._db.commit()


def _base_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must be http(s)://host[:port][/v1], got {url!r}")
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@register_reward("llm_judge")
class LLMJudge:
    """Reward from a judge model (see the module docstring for every option)."""

    def __init__(
        self,
        *,
        url: str,
        model: str | None = None,
        api: str = "chat",
        template: str = DEFAULT_TEMPLATE,
        system: str | None = None,
        score_pattern: str = DEFAULT_SCORE_PATTERN,
        min_score: float = 0.0,
        max_score: float = 10.0,
        normalize: bool = True,
        on_unparseable: str = "none",
        max_unparseable_fraction: float = 0.5,
        temperature: float = 0.0,
        seed: int | None = None,
        max_tokens: int = 64,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        cache: bool = True,
        cache_file: str | None = None,
        api_key_env: str | None = None,
    ) -> None:
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be chat or completions, got {api!r}")
        if on_unparseable not in ("none", "error"):
            raise ValueError(f"on_unparseable must be none or error, got {on_unparseable!r}")
        if not min_score < max_score:
            raise ValueError(f"min_score must be below max_score ({min_score}, {max_score})")
        if not 0 <= max_unparseable_fraction <= 1:
            raise ValueError("max_unparseable_fraction must lie in [0, 1]")
        if timeout <= 0 or max_retries < 0 or concurrency < 1 or max_tokens < 1:
            raise ValueError("timeout > 0, max_retries >= 0, concurrency >= 1, max_tokens >= 1")
        if cache_file and not cache:
            raise ValueError("cache_file is set but cache is false")
        try:
            self.pattern = re.compile(score_pattern)
        except re.error as err:
            raise ValueError(f"score_pattern is not a regular expression: {err}") from None
        if self.pattern.groups != 1:
            raise ValueError(
                f"score_pattern needs exactly one group (the number): {score_pattern!r}"
            )
        self.url = _base_url(url)
        self.api, self.template, self.system = api, template, system
        self.min_score, self.max_score, self.normalize = min_score, max_score, normalize
        self.on_unparseable = on_unparseable
        self.max_unparseable_fraction = max_unparseable_fraction
        self.temperature, self.seed, self.max_tokens = temperature, seed, max_tokens
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.cache = _Cache(cache_file) if cache else None
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ConfigError(
                    f"reward function 'llm_judge': the environment variable {api_key_env} is not set"
                )
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        try:
            listing = self._http("GET", "/models", None, where="listing the models")
            return str(listing["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise ConfigError(
                f"reward function 'llm_judge': {self.url}/models lists no model"
            ) from None
        except JudgeError as err:
            raise ConfigError(f"{err}; set options.model or start the server") from None

    def _http(self, method: str, path: str, payload: Any, where: str) -> Any:
        """One request with retries (see the module docstring); the decoded JSON reply."""
        url = self.url + path
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                body = err.read().decode("utf-8", errors="replace")[:300]
                problem = f"HTTP {err.code}: {body}"
                if err.code not in (408, 429) and err.code < 500:
                    raise JudgeError(
                        f"reward function 'llm_judge': {where}: {method} {url}: {problem}"
                    ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                problem = f"{type(reason).__name__}: {reason}"
            except json.JSONDecodeError as err:
                raise JudgeError(
                    f"reward function 'llm_judge': {where}: {url} sent no JSON ({err})"
                ) from None
        raise JudgeError(
            f"reward function 'llm_judge': {where}: {method} {url} failed {self.max_retries + 1} times, last: "
            f"{problem}"
        )

    def render(self, prompt: str, completion: str, row: Mapping[str, Any]) -> str:
        """The judge's prompt for one completion."""
        fields = {**row, "prompt": prompt, "completion": completion}
        fields |= {"min_score": f"{self.min_score:g}", "max_score": f"{self.max_score:g}"}
        try:
            return self.template.format_map(fields)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"reward function 'llm_judge': template field {err} is not a column of the rows nor one of "
                f"prompt, completion, min_score, max_score (double literal braces: {{{{ }}}})"
            ) from None

    def reply(self, text: str, where: str) -> str:
        """The judge's reply to ``text`` (cached)."""
        if self.api == "chat":
            system = [{"role": "system", "content": self.system}] if self.system else []
            payload: dict[str, Any] = {"messages": [*system, {"role": "user", "content": text}]}
        else:
            payload = {"prompt": f"{self.system}\n\n{text}" if self.system else text}
        payload |= {"model": self.model, "max_tokens": self.max_tokens}
        payload["temperature"] = self.temperature
        if self.seed is not None:
            payload["seed"] = self.seed
        key = json.dumps([self.url, self.api, payload], sort_keys=True)
        cached = self.cache.get(key) if self.cache else None
        if cached is not None:
            return cached
        path = "/chat/completions" if self.api == "chat" else "/completions"
        answer = self._http("POST", path, payload, where)
        try:
            choice = answer["choices"][0]
            content = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(
                f"reward function 'llm_judge': {where}: unexpected reply {answer!r:.200}"
            ) from None
        content = str(content or "")
        if self.cache:
            self.cache.put(key, content)
        return content

    def __call__(
        self, prompts: list[str], completions: list[str], **fields: Sequence[Any]
    ) -> list[float | None]:
        columns = row_columns(fields)
        rows = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
        texts = [
            self.render(prompt_text(p), completion_text(c), r)
            for p, c, r in zip(prompts, completions, rows, strict=True)
        ]

        def ask(i: int) -> str:
            try:
                return self.reply(texts[i], f"sample {i}")
            except JudgeError as err:
                raise JudgeError(
                    f"{err}; the sample:{describe_sample(prompts, completions, i)}"
                ) from None

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            replies = list(pool.map(ask, range(len(texts))))
        scores = [
            parse_score(r, self.pattern, self.min_score, self.max_score, self.normalize)
            for r in replies
        ]
        failed = [i for i, s in enumerate(scores) if s is None]
        if failed and (
            self.on_unparseable == "error"
            or len(failed) > self.max_unparseable_fraction * len(scores)
        ):
            i = failed[0]
            raise JudgeError(
                f"reward function 'llm_judge': {len(failed)} of {len(scores)} replies have no score matching "
                f"{self.pattern.pattern!r} in [{self.min_score:g}, {self.max_score:g}]; "
                f"sample {i}'s reply: {replies[i][:200]!r}{describe_sample(prompts, completions, i)}"
            )
        return scores
