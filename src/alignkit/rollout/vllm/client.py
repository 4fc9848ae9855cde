"""HTTP client of one vLLM OpenAI-compatible server: token ids in, token ids and log-probs out.

Routes used (vLLM 0.32; the server is ``python -m vllm.entrypoints.openai.api_server``):

- ``POST /v1/completions`` with ``prompt`` a list of token ids (no tokenisation on the server),
  ``n`` samples, ``seed`` (vLLM gives sample ``j`` of an ``n``-sample request the seed
  ``seed + j``), ``logprobs: 0`` (the sampled token's log-prob alone) and
  ``return_token_ids: true`` (each choice carries ``token_ids``: the sampled ids, never
  re-tokenised from text). The log-probs are those of the distribution actually sampled only
  when the server runs with ``--logprobs-mode processed_logprobs`` (after temperature, top-k,
  top-p, renormalised); vLLM's default ``raw_logprobs`` reports the raw model distribution
  (temperature 1, no truncation). :meth:`VLLMClient.check_processed_logprobs` tells them apart.
- The same route with ``prompt_logprobs: 0`` and ``max_tokens: 1`` scores fixed sequences: each
  prompt token's log-prob under the model's raw distribution (temperature 1; vLLM computes
  prompt log-probs from the raw logits in every ``logprobs_mode``).
- ``GET /health``; dev mode (``VLLM_SERVER_DEV_MODE=1``): ``POST /collective_rpc`` and
  ``POST /reset_prefix_cache``; ``POST /v1/load_lora_adapter`` (``--enable-lora`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).

Every call has a timeout; refused/reset connections and 502/503 answers are retried a bounded
number of times, then raise :class:`VLLMError`. A timed-out call is not retried (the server may
still be working on it): it raises at once.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.errors import AlignkitError

__all__ = ["Completion", "VLLMClient", "VLLMError"]

_RETRY_STATUS = (502, 503)


class VLLMError(AlignkitError):
    """A vLLM server could not be reached, answered an error, or timed out."""


@dataclass(frozen=True)
class Completion:
    """One sampled continuation: its token ids, their log-probs, and why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop token) or "length" (max_tokens reached)


class VLLMClient:
    """Calls one server at ``url`` (e.g. ``http://127.0.0.1:8000``).

    Args:
        url: the server's base URL.
        model: the served model name (``--served-model-name``).
        timeout: seconds to wait for any one answer.
        retries: extra attempts after a refused/reset connection or a 502/503.
        backoff: seconds before the first retry, doubled each time.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str = "policy",
        timeout: float = 300.0,
        retries: int = 2,
        backoff: float = 0.5,
    ) -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError(f"need timeout > 0 and retries >= 0, got {timeout}, {retries}")
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """One HTTP call; the decoded JSON answer (its text if not JSON, None if empty)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        wait = self.timeout if timeout is None else timeout
        where = f"{method} {self.url}{path}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=wait) as answer:
                    raw = answer.read().decode(errors="replace")
                return _decode(raw)
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:600]
                if err.code in _RETRY_STATUS and attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                raise VLLMError(f"vLLM {where} answered HTTP {err.code}: {detail}") from err
            except TimeoutError as err:
                raise VLLMError(f"vLLM {where} timed out after {wait:g} s") from err
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, TimeoutError):
                    raise VLLMError(f"vLLM {where} timed out after {wait:g} s") from err
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                raise VLLMError(
                    f"vLLM {where} failed after {self.retries + 1} attempt(s): {reason}"
                ) from err
        raise AssertionError("unreachable: the loop returns or raises")

    def healthy(self, timeout: float = 5.0) -> bool:
        """Whether ``GET /health`` answers 200 now (one try, no retries)."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as answer:
                return answer.status == 200
        except (OSError, ValueError):
            return False

    def complete(
        self,
        prompt_ids: Sequence[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        banned_token_ids: Sequence[int] = (),
        model: str | None = None,
    ) -> list[Completion]:
        """``n`` continuations of one token-id prompt, in sample order. ``banned_token_ids`` get
        a logit bias of -100 (OpenAI's floor): probability below ``exp(-100 / T)`` of the rest,
        so never drawn, and the recorded log-probs are those of the distribution without them."""
        body: dict[str, Any] = {
            "model": model or self.model,
            "prompt": list(prompt_ids),
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_k": top_k if top_k > 0 else -1,  # vLLM: -1 (or 0) = all tokens
            "top_p": top_p,
            "logprobs": 0,
            "return_token_ids": True,
            "ignore_eos": ignore_eos,
            "skip_special_tokens": False,
        }
        if seed is not None:
            body["seed"] = seed
        if banned_token_ids:
            body["logit_bias"] = {str(t): -100.0 for t in banned_token_ids}
        answer = self.request("POST", "/v1/completions", body)
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        if len(choices) != n:
            raise VLLMError(f"vLLM {self.url}: asked for {n} samples, got {len(choices)}")
        out = []
        for choice in choices:
            ids = choice.get("token_ids")
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            if ids is None or logprobs is None or len(ids) != len(logprobs):
                raise VLLMError(
                    f"vLLM {self.url}: a choice lacks token_ids or log-probs (is this vLLM "
                    f">= 0.10 with return_token_ids?): {json.dumps(choice)[:300]}"
                )
            out.append(Completion(list(ids), [float(x) for x in logprobs], choice["finish_reason"]))
        return out

    def score(
        self, sequences: Sequence[Sequence[int]], *, model: str | None = None
    ) -> list[list[float]]:
        """Log-probs of tokens ``1..L-1`` of each sequence under the model's raw distribution
        (temperature 1), one request for all sequences (``prompt_logprobs``)."""
        body = {
            "model": model or self.model,
            "prompt": [list(s) for s in sequences],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "return_token_ids": True,
        }
        answer = self.request("POST", "/v1/completions", body)
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        if len(choices) != len(sequences):
            raise VLLMError(f"vLLM {self.url}: scored {len(choices)} of {len(sequences)} rows")
        out = []
        for sequence, choice in zip(sequences, choices, strict=True):
            entries = choice.get("prompt_logprobs") or []
            values = []
            for token, entry in zip(list(sequence)[1:], entries[1:], strict=True):
                if entry is None or str(token) not in entry:
                    raise VLLMError(f"vLLM {self.url}: no prompt log-prob for token {token}")
                values.append(float(entry[str(token)]["logprob"]))
            out.append(values)
        return out

    def check_processed_logprobs(
        self, prompt_ids: Sequence[int], *, model: str | None = None
    ) -> None:
        """Raise unless the server reports log-probs of the distribution it samples from.

        With ``top_k = 1`` that distribution is a point mass, so ``--logprobs-mode
        processed_logprobs`` reports log-prob 0 exactly, while the default ``raw_logprobs``
        reports the raw model's (negative) log-prob of the argmax token.
        """
        (sample,) = self.complete(
            prompt_ids, n=1, max_tokens=1, temperature=1.0, top_k=1, seed=0, model=model
        )
        if abs(sample.logprobs[0]) > 1e-6:
            raise VLLMError(
                f"vLLM {self.url} reports raw log-probs (top_k=1 gave {sample.logprobs[0]:.4f}, "
                "not 0): start it with `--logprobs-mode processed_logprobs` so the behaviour "
                "log-probs are those of the distribution it samples from"
            )

    def collective_rpc(
        self, method: str, args: Sequence[str] = (), *, timeout: float | None = None
    ) -> list[Any]:
        """Call ``method`` on every worker (``POST /collective_rpc``, dev mode); one result
        per worker."""
        body: dict[str, Any] = {"method": method, "args": list(args)}
        if timeout is not None:
            body["timeout"] = timeout
        answer = self.request("POST", "/collective_rpc", body, timeout=timeout)
        return list((answer or {}).get("results", []))

    def reset_prefix_cache(self) -> None:
        """Drop cached prompt KV blocks (computed with the old weights after a sync)."""
        answer = self.request("POST", "/reset_prefix_cache")
        if isinstance(answer, dict) and answer.get("success") is False:
            raise VLLMError(f"vLLM {self.url}: /reset_prefix_cache reported failure")

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load (or replace in place) the LoRA adapter ``name`` from the directory ``path``."""
        body = {"lora_name": name, "lora_path": path, "load_inplace": True}
        self.request("POST", "/v1/load_lora_adapter", body)


def _decode(raw: str) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
