"""A small client for any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, Ollama, ...).

Used as the LLaVA-Bench judge. It exists instead of the ``openai`` package so that the only
dependency is ``requests`` and so that retries are explicit and testable: transient failures
(HTTP 429/5xx, timeouts, dropped connections, non-JSON bodies) are retried with exponential
backoff; configuration errors (401/403/404) abort at once, since every later request would fail
the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import requests

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})


class JudgeError(RuntimeError):
    """A request failed for good (retries exhausted or a non-retriable HTTP error)."""


class JudgeFatalError(JudgeError):
    """The endpoint rejects our configuration (bad key, model or URL): stop the whole run."""


@dataclass
class JudgeReply:
    content: str
    model: str | None  # the model name the server reports (snapshot), for reproducibility


def chat_completions_url(base_url: str) -> str:
    """``https://host/v1`` -> ``https://host/v1/chat/completions``; a full endpoint URL is kept."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + "/chat/completions"


@dataclass
class JudgeClient:
    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    max_retries: int = 5
    backoff: float = 2.0
    max_backoff: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @classmethod
    def from_env(cls, base_url: str, model: str, **kwargs) -> "JudgeClient":
        """Key from OPENAI_API_KEY when set (local servers usually need none)."""
        return cls(base_url=base_url, model=model, api_key=os.environ.get("OPENAI_API_KEY") or None, **kwargs)

    @property
    def url(self) -> str:
        return chat_completions_url(self.base_url)

    def _session(self) -> requests.Session:
        # requests.Session is not guaranteed thread-safe: one per worker thread.
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = requests.Session()
            self._local.session = sess
        return sess

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        delay = self.backoff * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                logger.debug("Retry-After %r is not in seconds; using our own backoff", retry_after)
        return min(delay, self.max_backoff)

    def chat(self, messages: list[dict], temperature: float = 0.2, max_tokens: int = 1024) -> JudgeReply:
        """POST one chat request; returns the first choice's text. Raises JudgeError/JudgeFatalError."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        payload = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = self._session().post(self.url, json=payload, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                last_error = f"timeout after {self.timeout}s"
            except requests.ConnectionError as e:
                last_error = f"connection error: {e}"
            else:
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                        message = data["choices"][0]["message"]
                        content = message.get("content") or ""
                        return JudgeReply(content=content, model=data.get("model"))
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                        last_error = f"HTTP 200 without a chat completion in the body: {resp.text[:200]!r}"
                elif resp.status_code in FATAL_STATUS:
                    auth = resp.status_code in (401, 403)
                    hint = " (set OPENAI_API_KEY?)" if auth else " (check the model name / base URL)"
                    raise JudgeFatalError(
                        f"{self.url} answered HTTP {resp.status_code}{hint}: {resp.text[:300]}")
                elif resp.status_code in RETRY_STATUS:
                    last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    retry_after = resp.headers.get("Retry-After")
                else:
                    raise JudgeError(f"{self.url} answered HTTP {resp.status_code}: {resp.text[:300]}")
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                logger.warning("judge request failed (%s); retry %d/%d in %.2fs",
                               last_error, attempt + 1, self.max_retries, delay)
                self.sleep(delay)
        raise JudgeError(f"{self.url}: giving up after {self.max_retries + 1} attempts; last error: {last_error}")
