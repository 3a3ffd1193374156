"""The teacher LLM (the paper: gpt-3.5-turbo) that writes the summaries of Stage 1 and the reasons of Stage 2.

Settings come from the environment, never from the source:
    OPENAI_API_KEY        required for the OpenAI-protocol teacher
    OPENAI_BASE_URL       optional: any OpenAI-compatible endpoint (read by the openai client itself)
    TEACHER_MODEL         default gpt-3.5-turbo
    TEACHER_CONCURRENCY   requests in flight at once (default 16)
    TEACHER_MAX_RETRIES   retries with backoff on 429 / 5xx / timeouts, done by the openai client (default 6)
    TEACHER_TIMEOUT       seconds per request (default 120)
    TEACHER_MAX_TOKENS    default 4096, as in the official code
    TEACHER=local with TEACHER_MODEL_PATH=<model folder> uses a local model instead (offline demos), generating
    TEACHER_BATCH_SIZE prompts at a time (default 8).

Every answer goes into an on-disk cache keyed by the request as soon as it arrives, so a rerun after a crash or a
Ctrl-C pays for nothing twice.  Token usage is recorded with each answer.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

import parallel
from cache import ResultCache
from utils import fail

HELP = ("set OPENAI_API_KEY (and optionally OPENAI_BASE_URL, TEACHER_MODEL; default gpt-3.5-turbo), "
        "or TEACHER=local with TEACHER_MODEL_PATH=<model folder> for an offline teacher")


class TeacherError(RuntimeError):
    pass


class Teacher:
    def __init__(self, cache_path: str | Path):
        """Checks the settings at once, so that a missing key fails before any work starts."""
        self.kind = os.environ.get("TEACHER", "openai")
        self.max_tokens = int(os.environ.get("TEACHER_MAX_TOKENS", 4096))
        self.concurrency = int(os.environ.get("TEACHER_CONCURRENCY", 16))
        self.usage = Counter()
        if self.kind == "local":
            self.path = os.environ.get("TEACHER_MODEL_PATH") or fail(f"TEACHER=local needs TEACHER_MODEL_PATH; {HELP}")
            if not Path(self.path, "config.json").exists() and not Path(self.path, "adapter_config.json").exists():
                fail(f"TEACHER_MODEL_PATH={self.path} is not a model folder")
            self.model = f"local:{Path(self.path).resolve()}"
            self._local = None
        elif self.kind == "openai":
            self._secret = os.environ.get("OPENAI_API_KEY") or fail(f"no teacher configured: {HELP}")
            from openai import OpenAI

            self.model = os.environ.get("TEACHER_MODEL", "gpt-3.5-turbo")
            self.client = OpenAI(max_retries=int(os.environ.get("TEACHER_MAX_RETRIES", 6)),
                                 timeout=float(os.environ.get("TEACHER_TIMEOUT", 120)))
        else:
            fail(f"TEACHER must be openai or local, not {self.kind!r}")
        self.cache = ResultCache(cache_path)

    def key(self, prompt: str, temperature: float, sample: int) -> str:
        """What determines an answer; `sample` tells the k-th independent draw for the same prompt apart."""
        return ResultCache.key("teacher", self.model, prompt, temperature, self.max_tokens, sample)

    def ask(self, prompts: list[str], *, temperature: float, samples=None, labels=None,
            desc: str = "teacher") -> list[str]:
        """The teacher's answers to `prompts` (one user turn each), in order.  `samples[i]` numbers repeated draws
        of one prompt; `labels[i]` names the row in errors."""
        samples = samples if samples is not None else [0] * len(prompts)
        labels = labels if labels is not None else [f"#{i}" for i in range(len(prompts))]
        keys = [self.key(p, temperature, s) for p, s in zip(prompts, samples)]
        found = self.cache.get_many(keys)
        todo = {k: (p, s, label) for k, p, s, label in zip(keys, prompts, samples, labels) if k not in found}
        self.usage["cached"] += len(set(keys)) - len(todo)
        if todo and self.kind == "local":  # a local model: every process of a data-parallel run takes its share
            found.update(self._ask_local(todo, temperature, desc))
        elif todo:  # a paid endpoint: the main process alone asks, and shares the answers
            found.update(parallel.broadcast(self._ask_remote(todo, temperature, desc) if parallel.is_main_process()
                                            else None))
        return [found[k] for k in keys]

    # ------------------------------------------------------------------------------------------ OpenAI protocol
    def _ask_remote(self, todo: dict, temperature: float, desc: str) -> dict:
        answers = {}
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(todo), desc=desc, unit="req") as bar:
            futures = {pool.submit(self._answer, key, prompt, temperature, sample, label): key
                       for key, (prompt, sample, label) in todo.items()}
            for future in as_completed(futures):
                if future.exception() is not None:
                    for other in futures:
                        other.cancel()
                    fail(f"{future.exception()}. The {len(answers):,} answers received so far are kept in "
                         f"{self.cache.path}; rerun the same command to continue from there.")
                answers[futures[future]] = future.result()
                bar.update(1)
        return answers

    def _answer(self, key: str, prompt: str, temperature: float, sample: int, label: str) -> str:
        """Ask, and keep the answer in the cache the moment it arrives."""
        text, usage = self._request(prompt, temperature, sample, label)
        self.cache.put_many({key: text}, meta=usage)
        return text

    def _request(self, prompt: str, temperature: float, sample: int, label: str) -> tuple[str, dict]:
        """One chat completion; `sample` goes out as the seed, so that the k-th draw is reproducible where the
        endpoint supports seeds.  429s, 5xx and timeouts are retried with backoff by the openai client itself; an
        empty or unreadable answer is asked for again here, twice at most."""
        import openai

        cause = None
        for _ in range(3):
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], temperature=temperature,
                    n=1, max_tokens=self.max_tokens, seed=sample)
                text = response.choices[0].message.content if response.choices else None
            except (openai.APIStatusError, openai.APIConnectionError) as e:  # retries already spent by the client
                raise TeacherError(self._safe(f"teacher request for row {label} failed: {type(e).__name__}: {e}")) from e
            except Exception as e:  # malformed JSON and the like
                cause = f"{type(e).__name__}: {e}"
                continue
            if text:
                return text, self._record(response)
            cause = "the answer was empty"
        raise TeacherError(self._safe(f"teacher request for row {label} failed: {cause}"))

    def _record(self, response) -> dict:
        usage = getattr(response, "usage", None)
        tokens = {"prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                  "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}
        self.usage.update(requests=1, **tokens)
        return tokens

    def _safe(self, message: str) -> str:
        return message.replace(self._secret, "***") if getattr(self, "_secret", None) else message

    # ------------------------------------------------------------------------------------------ local model
    def _ask_local(self, todo: dict, temperature: float, desc: str) -> dict:
        import llm

        if self._local is None:
            self._local = llm.load_model(self.path, cache=self.cache, max_new_tokens=self.max_tokens,
                                         batch_size=int(os.environ.get("TEACHER_BATCH_SIZE", 8)))
        answers = {}
        for sample in sorted({s for _, s, _ in todo.values()}):
            group = {k: p for k, (p, s, _) in todo.items() if s == sample}
            texts = self._local.generate(list(group.values()), temperature=temperature, seed=sample, keys=list(group),
                                         desc=desc)
            answers.update(zip(group, texts))
            self.usage["requests"] += len(group)
        return answers

    def report(self) -> str:
        u = self.usage
        return (f"teacher {self.model}: {u['requests']:,} new requests ({u['prompt_tokens']:,} prompt + "
                f"{u['completion_tokens']:,} completion tokens), {u['cached']:,} answers from the cache")
