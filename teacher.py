"""The teacher LLM (the paper: gpt-3.5-turbo) that writes the summaries of Stage 1 and the reasons of Stage 2.

Settings come from the environment, never from the source:
    OPENAI_API_KEY        required for the OpenAI-protocol teacher
    OPENAI_BASE_URL       optional: any OpenAI-compatible endpoint (read by the openai client itself)
    TEACHER_MODEL         default gpt-3.5-turbo
    TEACHER_CONCURRENCY   requests in flight at once (default 16)
    TEACHER_MAX_RETRIES   retries with backoff on 408 / 429 / 5xx / timeouts, done by the openai client (default 6)
    TEACHER_TIMEOUT       seconds per request (default 120)
    TEACHER_MAX_TOKENS    default 4096, as in the official code
    TEACHER_BATCH=1       send a step's requests through the OpenAI Batch API instead (teacher_batch.py): half the
                          price, answers within 24 hours; TEACHER_BATCH_POLL: the longest wait between two looks at
                          them (default 60 s); TEACHER_BATCH_TOKENS: the estimated prompt tokens of one batch at most
                          (default 1,000,000), to fit the organization's enqueued-token limit
    TEACHER_PRICES        USD per 1M prompt and completion tokens, a JSON file or inline JSON, e.g.
                          '{"gpt-4o-mini": [0.15, 0.6]}': overrides or extends PRICES below
    TEACHER=local with TEACHER_MODEL_PATH=<model folder> uses a local model instead (offline demos), generating
    TEACHER_BATCH_SIZE prompts at a time (default 8).

Every answer goes into an on-disk cache as soon as it arrives, keyed by the request and by who answers it (the model
and its endpoint; a local teacher's weights); a rerun asks for nothing it has.
What each kind of stop costs:
    Ctrl-C, SIGINT, SIGTERM   one by one: nothing new is sent, the requests in flight are awaited (at most
                              TEACHER_TIMEOUT; a second Ctrl-C stops waiting) and kept, and the step exits with 130
                              (SIGINT) or 143 (SIGTERM).  The rerun pays for nothing twice.
    SIGKILL, power loss       one by one: the answers of the requests in flight at that moment are lost, so the rerun
                              pays again for those: at most TEACHER_CONCURRENCY requests.
    any stop, Batch API       nothing: the batches keep running at the API.  A batch's id is kept in the cache as soon
                              as it exists, and its `metadata` names its step and contents, so that a rerun (in either
                              mode) finds even one created just before the kill (`batches.list`) and polls it instead
                              of sending again.
The seeds, temperatures and cache keys are the same in both modes, so a step can switch modes and keep its answers.
Each step reports its tokens and their cost; `--dry_run` prints the requests, tokens and cost before anything is sent.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

from tqdm.auto import tqdm

import parallel
from cache import ResultCache
from teacher_batch import BATCH_TOKENS, BatchAPI, empty_cause
from utils import Stop, exit_stopped, fail, stop_signals

OPENAI_ENDPOINT = "https://api.openai.com/v1"  # the openai client's default base URL
HELP = ("set OPENAI_API_KEY (and optionally OPENAI_BASE_URL, TEACHER_MODEL; default gpt-3.5-turbo), "
        "or TEACHER=local with TEACHER_MODEL_PATH=<model folder> for an offline teacher")

# USD per 1M prompt (input) and completion (output) tokens: OpenAI's list prices for its standard API, from OpenAI's
# pricing page, 2026-11-28.  Prices change: TEACHER_PRICES overrides or extends them.  A dated snapshot
# (gpt-4o-mini-2024-07-18) takes its model's price.
PRICES = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}
BATCH_DISCOUNT = 0.5  # the Batch API bills half the list price
CHARS_PER_TOKEN = 4  # a prompt's tokens are estimated (--dry_run, the Batch API's parts) as its characters / 4
# Models that reason before they answer (OpenAI's o-series and gpt-5, but not gpt-5-chat): they take
# max_completion_tokens instead of max_tokens, and only their default temperature, 1.
REASONING = re.compile(r"(o\d|gpt-5)([-.].*)?")
GUESSED_ANSWER_TOKENS = 200  # --dry_run's guess of an answer's length, where the cache holds no answer to average


@dataclass
class TeacherArguments:
    dry_run: bool = field(default=False, metadata={
        "help": "print how many requests the teacher would be sent, about how many tokens, and what they would cost; "
                "then stop, before anything is sent or any model loaded"})


class TeacherError(RuntimeError):
    pass


def setting(name: str, default, kind=int):
    value = os.environ.get(name, default)
    try:
        return kind(value)
    except ValueError:
        fail(f"{name}={value!r} is not a {kind.__name__}")


def load_prices() -> dict:
    prices, given = dict(PRICES), os.environ.get("TEACHER_PRICES", "").strip()
    if given:
        try:
            table = json.loads(given if given.startswith("{") else Path(given).read_text())
            prices.update({str(model): (float(p[0]), float(p[1])) for model, p in table.items()})
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            fail(f"TEACHER_PRICES must be a JSON file or inline JSON such as '{{\"gpt-4o-mini\": [0.15, 0.6]}}' (USD "
                 f"per 1M prompt and completion tokens); {given[:80]!r} is not ({type(e).__name__}: {e})")
    return prices


class Teacher:
    def __init__(self, cache_path: str | Path, dry_run: bool = False, temperatures=()):
        """Checks the settings at once, so that a missing key, a temperature the model does not take (the step names
        the `temperatures` it asks at) or an endpoint without the Batch API (under TEACHER_BATCH=1) fails before any
        work starts.  A dry run needs no key and sends nothing."""
        self.kind = os.environ.get("TEACHER", "openai")
        self.max_tokens = setting("TEACHER_MAX_TOKENS", 4096)
        self.concurrency = setting("TEACHER_CONCURRENCY", 16)
        self.timeout = setting("TEACHER_TIMEOUT", 120, float)
        self.max_retries = setting("TEACHER_MAX_RETRIES", 6)
        self.poll = setting("TEACHER_BATCH_POLL", 60, float)
        self.batch_tokens = setting("TEACHER_BATCH_TOKENS", BATCH_TOKENS, float)
        self.batch = os.environ.get("TEACHER_BATCH", "0") or "0"
        if self.batch not in ("0", "1"):
            fail(f"TEACHER_BATCH must be 1 (through the Batch API) or 0 (one by one), not {self.batch!r}")
        self.batch = self.batch == "1"
        self.prices = load_prices()
        self.dry_run = dry_run
        self.usage, self._usage_lock = Counter(), threading.Lock()
        if self.kind == "local":
            self.path = os.environ.get("TEACHER_MODEL_PATH") or fail(f"TEACHER=local needs TEACHER_MODEL_PATH; {HELP}")
            if not Path(self.path, "config.json").exists() and not Path(self.path, "adapter_config.json").exists():
                fail(f"TEACHER_MODEL_PATH={self.path} is not a model folder")
            if self.batch:
                fail("TEACHER_BATCH=1 sends the requests through the OpenAI Batch API, which the local teacher "
                     "(TEACHER=local) does not have: unset TEACHER_BATCH, or use an OpenAI endpoint")
            self.model = f"local:{Path(self.path).resolve()}"
            self._local = None
            import llm

            self.source = f"local weights {llm.fingerprint(self.path)}"
        elif self.kind == "openai":
            self.model = os.environ.get("TEACHER_MODEL", "gpt-3.5-turbo")
            endpoint = (os.environ.get("OPENAI_BASE_URL") or OPENAI_ENDPOINT).rstrip("/")
            self.source = self.model if endpoint == OPENAI_ENDPOINT else f"{self.model} at {endpoint}"
            if not dry_run:
                self._secret = os.environ.get("OPENAI_API_KEY") or fail(f"no teacher configured: {HELP}")
                from openai import OpenAI

                self.client = OpenAI(max_retries=self.max_retries, timeout=self.timeout)
        else:
            fail(f"TEACHER must be openai or local, not {self.kind!r}")
        self.reasoning = self.kind == "openai" and bool(REASONING.fullmatch(self.model)) and "-chat" not in self.model
        for temperature in temperatures:
            self.check(temperature)
        self.cache = ResultCache(cache_path)
        if self.kind == "openai" and not dry_run:
            self.batches = BatchAPI(self)
            if self.batch and parallel.is_main_process():
                self.batches.check()

    def key(self, prompt: str, temperature: float, sample: int) -> str:
        """What determines an answer: the model (and the endpoint that serves it; a local teacher's weights), the
        request, and `sample`, which tells the k-th independent draw for the same prompt apart."""
        return ResultCache.key("teacher", self.source, prompt, temperature, self.max_tokens, sample)

    def ask(self, prompts: list[str], *, temperature: float, samples=None, labels=None,
            desc: str = "teacher") -> list[str]:
        """The teacher's answers to `prompts` (one user turn each), in order.  `samples[i]` numbers repeated draws
        of one prompt; `labels[i]` names the row in errors.  Under --dry_run: print what this would send, and stop."""
        samples = samples if samples is not None else [0] * len(prompts)
        labels = labels if labels is not None else [f"#{i}" for i in range(len(prompts))]
        self.check(temperature)
        if self.dry_run:
            self.estimate([(desc, prompts, temperature, samples)])
        keys, found = self._lookup(prompts, temperature, samples)
        todo = {k: (p, s, label) for k, p, s, label in zip(keys, prompts, samples, labels) if k not in found}
        self.usage["cached"] += len(set(keys)) - len(todo)
        if todo and self.kind == "local":  # a local model: every process of a data-parallel run takes its share
            found.update(self._ask_local(todo, temperature, desc))
        elif todo and parallel.is_main_process():  # a paid endpoint: the main process alone asks
            found.update((self.batches.ask if self.batch else self._ask_one_by_one)(todo, temperature, desc))
        elif todo:
            found.update(self._await(todo))
        return [found[k] for k in keys]

    def _await(self, todo: dict) -> dict:
        """Another process of a data-parallel run: wait for the main process to put the answers of `todo` into the
        cache file they share.  The wait may last hours (a batch takes up to 24): it stays outside the process group,
        whose collectives time out (30 minutes by default).  Should the main process fail, the launcher ends this one."""
        while len(answers := self.cache.get_many(todo)) < len(todo):
            time.sleep(1.0)
        return answers

    def _lookup(self, prompts: list[str], temperature: float, samples) -> tuple[list[str], dict]:
        """The cache keys of these requests, and the answers the cache already holds."""
        keys = [self.key(p, temperature, s) for p, s in zip(prompts, samples)]
        return keys, self.cache.get_many(keys)

    def check(self, temperature: float):
        """Refuse, before anything is sent, a temperature that the model does not take."""
        if self.reasoning and temperature != 1:
            fail(f"the teacher {self.model} is a reasoning model, which takes only its default temperature, 1; this "
                 f"step asks at temperature {temperature:g}, as the method does (0.2 for the summaries, 1.0 for the "
                 f"reasons, 0 for the judge). Choose a model that takes a temperature (TEACHER_MODEL, e.g. "
                 f"gpt-4o-mini or gpt-4.1-mini); nothing was sent.")

    def params(self, prompt: str, temperature: float, sample: int) -> dict:
        """One chat-completion request, the same one by one and in a batch; `sample` goes out as the seed, so that
        the k-th draw is reproducible where the endpoint supports seeds.  A reasoning model takes
        max_completion_tokens (it rejects max_tokens)."""
        limit = "max_completion_tokens" if self.reasoning else "max_tokens"
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": temperature,
                "n": 1, limit: self.max_tokens, "seed": sample}

    @staticmethod
    def estimated_tokens(prompt: str) -> float:
        return len(prompt) / CHARS_PER_TOKEN

    # ------------------------------------------------------------------------------------------ one by one
    def _ask_one_by_one(self, todo: dict, temperature: float, desc: str) -> dict:
        """TEACHER_CONCURRENCY threads ask at once; each answer is cached the moment it arrives.  A failure, Ctrl-C
        or SIGTERM stops the sending; the requests in flight are awaited and kept: a rerun pays for nothing twice."""
        collected = self.batches.collect(todo)  # answers of an earlier TEACHER_BATCH=1 run
        todo = {k: v for k, v in todo.items() if k not in collected}
        jobs, results, stopping = deque(todo.items()), Queue(), threading.Event()
        busy, lock = set(), threading.Lock()  # the keys of the requests in flight

        def work():
            while True:
                with lock:  # once `stopping` is set, no thread takes another request
                    if stopping.is_set() or not jobs:
                        return
                    key, (prompt, sample, label) = jobs.popleft()
                    busy.add(key)
                try:
                    results.put((key, self._answer(key, prompt, temperature, sample, label)))
                except Exception as e:
                    stopping.set()
                    results.put((key, e))
                finally:
                    with lock:
                        busy.discard(key)

        answers, error, stop, left = {}, None, None, 0
        with tqdm(total=len(todo), desc=desc, unit="req") as bar, stop_signals():
            for _ in range(min(self.concurrency, len(todo))):
                threading.Thread(target=work, daemon=True).start()
            try:
                while len(answers) < len(todo) and error is None:
                    key, result = results.get()
                    if isinstance(result, Exception):
                        error = result
                    else:
                        answers[key] = result
                        bar.update(1)
            except Stop as s:
                stop = s
            if error is not None or stop is not None:
                with lock:
                    stopping.set()
                left = self._wait_for(busy, stop)
                while not results.empty():
                    key, result = results.get()
                    if not isinstance(result, Exception):
                        answers[key] = result
        kept = (f"The {len(answers):,} answers received so far are kept in {self.cache.path}"
                + (f"; {left} requests still in flight were given up: their answers are lost" if left else ""))
        if stop is not None:
            again = f"only those {left} requests may be paid again." if left else "nothing is paid twice."
            exit_stopped(stop, f"no request was sent after it. {kept}. Rerun the same command to continue: {again}")
        if error is not None:
            fail(f"{error}. {kept}; rerun the same command to continue from there.")
        return {**collected, **answers}

    def _wait_for(self, busy: set, stop: Stop | None) -> int:
        """Let the requests in flight finish (at most TEACHER_TIMEOUT; a second signal stops waiting); how many did
        not."""
        if busy:
            again = f"; {stop} again to stop waiting" if stop else ""
            print(f"\n{stop or 'a request failed'}: nothing new is sent; waiting up to {self.timeout:g} s "
                  f"(TEACHER_TIMEOUT) for the {len(busy)} requests in flight, to keep their answers{again}",
                  file=sys.stderr, flush=True)
        deadline = time.monotonic() + self.timeout
        try:
            while busy and time.monotonic() < deadline:
                time.sleep(0.02)
        except Stop:
            pass
        return len(busy)

    def _answer(self, key: str, prompt: str, temperature: float, sample: int, label: str) -> str:
        """Ask, and keep the answer in the cache the moment it arrives."""
        text, usage = self._request(prompt, temperature, sample, label)
        self.cache.put_many({key: text}, meta=usage)
        return text

    def _request(self, prompt: str, temperature: float, sample: int, label: str) -> tuple[str, dict]:
        """One chat completion.  408s, 429s, 5xx and timeouts are retried with backoff by the openai client itself
        (another 4xx is not: it would fail again); an unreadable answer, and an empty or refused one (billed all
        the same), is asked for again here, twice at most."""
        import openai

        cause = None
        for _ in range(3):
            try:
                response = self.client.chat.completions.create(**self.params(prompt, temperature, sample))
            except (openai.APIStatusError, openai.APIConnectionError) as e:  # retries already spent by the client
                raise TeacherError(self.safe(f"teacher request for row {label} failed: {type(e).__name__}: {e}")) from e
            except Exception as e:  # malformed JSON and the like
                cause = f"{type(e).__name__}: {e}"
                continue
            message = response.choices[0].message if response.choices else None
            text, usage = getattr(message, "content", None), response.usage
            meta = self.record(getattr(usage, "prompt_tokens", 0), getattr(usage, "completion_tokens", 0),
                               empty=not text)
            if text:
                return text, meta
            cause = empty_cause(getattr(message, "refusal", None))
        raise TeacherError(self.safe(f"teacher request for row {label} failed: {cause}"))

    def record(self, prompt_tokens, completion_tokens, batch: str | None = None, empty: bool = False) -> dict:
        """Count one answer's tokens (and whether it came at the Batch API's price, and was empty or refused, to be
        asked again); what is kept beside it."""
        tokens = {"prompt_tokens": prompt_tokens or 0, "completion_tokens": completion_tokens or 0}
        with self._usage_lock:
            self.usage.update(requests=1, empty=int(empty), **tokens)
            if batch:
                self.usage.update(batch_requests=1, **{f"batch_{k}": v for k, v in tokens.items()})
        return {**tokens, "batch": batch} if batch else tokens

    def safe(self, message: str) -> str:
        return message.replace(self._secret, "***") if getattr(self, "_secret", None) else message

    # ------------------------------------------------------------------------------------------ local model
    def _ask_local(self, todo: dict, temperature: float, desc: str) -> dict:
        import llm

        if self._local is None:
            self._local = llm.load_model(self.path, cache=self.cache, max_new_tokens=self.max_tokens,
                                         batch_size=setting("TEACHER_BATCH_SIZE", 8))
        answers = {}
        for sample in sorted({s for _, s, _ in todo.values()}):
            group = {k: p for k, (p, s, _) in todo.items() if s == sample}
            texts = self._local.generate(list(group.values()), temperature=temperature, seed=sample, keys=list(group),
                                         desc=desc)
            answers.update(zip(group, texts))
            self.usage["requests"] += len(group)
        return answers

    # ------------------------------------------------------------------------------------------ cost
    def price(self) -> tuple[float, float] | None:
        """USD per 1M prompt and completion tokens of this model, or None if unknown."""
        if self.kind == "local":
            return 0.0, 0.0
        names = [name for name in self.prices if self.model == name or self.model.startswith(name + "-")]
        return self.prices[max(names, key=len)] if names else None

    def usd(self, prompt_tokens: float, completion_tokens: float, batch: bool = False) -> float | None:
        """What these tokens cost at list prices (half through the Batch API); None for an unknown model."""
        price = self.price()
        if price is None:
            return None
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6 * (BATCH_DISCOUNT if batch else 1)

    def cost(self, usd: float | None) -> str:
        if self.kind == "local":
            return "no API cost (a local model)"
        if usd is None:
            return f"cost unknown (no price for {self.model}: give one in TEACHER_PRICES)"
        return f"${usd:,.4f}"

    def report(self) -> str:
        u = self.usage
        direct = self.usd(u["prompt_tokens"] - u["batch_prompt_tokens"],
                          u["completion_tokens"] - u["batch_completion_tokens"])
        batch = self.usd(u["batch_prompt_tokens"], u["batch_completion_tokens"], batch=True)
        usd = None if direct is None else direct + batch
        discount = (f"; the Batch API's {1 - BATCH_DISCOUNT:.0%} discount applied to {u['batch_requests']:,} of them"
                    if u["batch_requests"] else "")
        empty = f", {u['empty']:,} of them empty or refused, asked again" if u["empty"] else ""
        return (f"teacher {self.model}: {u['requests']:,} new requests ({u['prompt_tokens']:,} prompt + "
                f"{u['completion_tokens']:,} completion tokens: {self.cost(usd)}"
                f"{' at list prices' if usd is not None and self.kind != 'local' else ''}{discount}{empty}), "
                f"{u['cached']:,} answers from the cache")

    def estimate(self, calls):
        """--dry_run: print, for each (desc, prompts, temperature, samples) in `calls`, the requests that are not in
        the cache, about how many tokens they hold and what they would cost; then exit, having sent nothing."""
        mean, n = self.cache.average("completion_tokens")
        guess = (f"{mean:,.0f} per answer, the mean of the {n:,} answers in the cache" if n else
                 f"a guess of {min(GUESSED_ANSWER_TOKENS, self.max_tokens)} per answer")
        mean = mean if n else min(GUESSED_ANSWER_TOKENS, self.max_tokens)
        how = "through the Batch API (half price)" if self.batch else "one by one"
        lines, total = [], Counter()
        for desc, prompts, temperature, samples in calls:
            keys, cached = self._lookup(prompts, temperature, samples)
            new = {k: p for k, p in zip(keys, prompts) if k not in cached}
            tokens = Counter(requests=len(new), cached=len(set(keys)) - len(new),
                             prompt=sum(map(self.estimated_tokens, new.values())),
                             completion=len(new) * mean, most=len(new) * self.max_tokens)
            total.update(tokens)
            lines.append(self._estimate_line(desc, tokens))
        if len(calls) > 1:
            lines.append(self._estimate_line("all of the above", total))
        if parallel.is_main_process():
            print(f"dry run, nothing sent: the teacher {self.model}, {how}. Prompt tokens are approximate (characters /"
                  f" {CHARS_PER_TOKEN}); completion tokens are estimated ({guess}) and at most TEACHER_MAX_TOKENS="
                  f"{self.max_tokens} per request.\n" + "\n".join(lines), flush=True)
        raise SystemExit(0)

    def _estimate_line(self, desc: str, t: Counter) -> str:
        return (f"  {desc}: {t['requests']:,.0f} requests ({t['cached']:,.0f} more answered by the cache), "
                f"~{t['prompt']:,.0f} prompt tokens, ~{t['completion']:,.0f} completion tokens (at most "
                f"{t['most']:,.0f}): ~{self.cost(self.usd(t['prompt'], t['completion'], self.batch))} (at most "
                f"{self.cost(self.usd(t['prompt'], t['most'], self.batch))})")
