"""The provider's Batch API for large passes: chat calls collected, sent as one batch.

OpenAI's Batch API (``/v1/files`` + ``/v1/batches``) answers a file of requests within
24 hours at half the synchronous price (the rate lives in the pricing table:
:func:`afnio.models.pricing.get_batch_price`). afnio drives it for passes that need no
answer right away (``Trainer.validate/test/predict(..., batch_api=True)``):

1. **Collect.** The pass runs with a :class:`BatchCollector` active. Every chat call
   of an afnio OpenAI client (``chat``/``achat``, so every ``ChatCompletion`` forward
   and LM judge of the pass) whose answer is not known yet is *collected* and raises
   :class:`BatchDeferred` (a ``BaseException``, so a program's ``except Exception``
   does not swallow it): the unit of work that made it (a Trainer batch) stops there.
   Calls already answered are served from the answers at once, with no request.
2. **Submit and poll.** The collected requests become one JSONL file per client
   (``custom_id`` = a hash of the request), uploaded with ``files.create`` and run
   by ``batches.create``; the batch id is saved (:class:`BatchStore`) before any
   polling, and ``batches.retrieve`` is polled every ``poll_interval`` seconds with
   a progress bar (completed and failed lines).
3. **Map back.** The output file (``files.content``) is matched to the requests by
   ``custom_id``, never by line order. Each answered line is accounted once: its
   usage and its cost **at the batch price** go to the client's usage and ``calls``,
   and to the phase ledger (:data:`afnio.models.phases.LEDGER`) under the phase it
   was made in.
4. **Repeat.** The pass runs again: the answered calls return at once, and calls
   that depend on them (a second ``ChatCompletion`` fed by the first) are collected
   as the next round: one batch per round of dependent calls. The pass that collects
   nothing is the final one, and its result is returned.

Failed items (an error line, or every line of a batch that ended ``failed``,
``expired`` or ``cancelled``) are simply not answered, so the next round collects
them again and sends them **as a new batch**; an item that went through
``max_attempts`` batches without an answer raises :class:`BatchFailed` naming it.

Budget: with a ``budget`` callback (the Trainer's ``max_cost``), each round's new
batches are priced before anything is submitted (:func:`projected_cost`: the prompt's
approximate tokens and the answer's bound, at the batch price); the callback raises to
refuse them, and then nothing is uploaded.

Resuming: the state (batch ids per round, the answers downloaded, the attempts, the
lines already accounted) is saved after every change, so an interrupted pass (Ctrl-C
while polling or downloading, a crash) resumes by running again with the same store:

* a submitted batch whose requests the pass still needs is polled again, never paid
  again;
* a batch being created is saved first as a ``"creating"`` record (its uploaded
  input file and a nonce sent in the batch ``metadata`` under :data:`NONCE_KEY`), so
  a batch created by an interrupted ``batches.create`` (or whose id was never saved)
  is found again with ``batches.list`` rather than sent and paid twice;
* the lines of an output file are accounted once each: the ``custom_id`` of every
  accounted line is kept in the record (``accounted``), the partial state is saved
  before an interruption propagates, and a resumed download skips those lines;
* a submitted batch that holds none of the requests the pass makes now (the program
  or the data changed) is *stale*: it is cancelled (``batches.cancel``), waited for
  until it ends (at most ``cancel_timeout``), and what the provider billed for it
  (its output file's lines, at the batch price) is accounted like any other line;
  its answers are not used.

Each record keeps its endpoint as ``mask_url(base_url)`` (no password) and a hash of
the full base URL and the client's account (API key, organization, project and
credential headers: never the key itself), so a resumed batch is polled by the
client that submitted it; a record no client of the pass matches raises
:class:`BatchClientNotFound` (see ``BatchOptions.abandon_unmatched``). The store is
cleared when the pass completes. ``Trainer.fit(..., batch_api=True)`` keeps the state
in its checkpoints (:class:`MemoryStore` with ``on_save``); a standalone pass in a
JSON file (:class:`BatchStore`).

A pass must make the same requests when it runs again (deterministic prompts; no
random choice between runs), and work other than LM calls is repeated once per round;
calls a program makes one after the other, each waiting for the previous one, take
one round each (make independent calls concurrently, as ``ChatCompletion`` does over
a batch). Every round must see the same data in the same order: a loader that
shuffles anew each epoch (a shuffling ``JsonlDataset`` stream, a ``RandomSampler``)
is wrapped in a :class:`ReplayLoader`, which rewinds it to the start of the pass's
epoch before each round (the Trainer does it for its passes).

Example::

    store = BatchStore(Path("runs/val/batch_api_state.json"), "validate")
    run = BatchRun(store, BatchOptions(poll_interval=30))
    replay = ReplayLoader(loader)  # once: every round sees the same batches
    accuracy = run.run(lambda: evaluate(agent, replay))
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from afnio._secrets import mask_url
from afnio.models.cache import cache_key
from afnio.models.phases import LEDGER, current_phase
from afnio.models.pricing import batch_cost_of

if TYPE_CHECKING:
    from afnio.models.openai import _OpenAIClient

__all__ = [
    "BATCH_STATE_FILE",
    "BudgetCheck",
    "BatchClientNotFound",
    "BatchCollector",
    "BatchDeferred",
    "BatchFailed",
    "BatchOptions",
    "BatchRun",
    "BatchStore",
    "BatchTimeout",
    "MemoryStore",
    "NONCE_KEY",
    "ReplayLoader",
    "active_collector",
    "collecting",
    "projected_cost",
]

logger = logging.getLogger("afnio.models")

T = TypeVar("T")

BATCH_STATE_FILE = "batch_api_state.json"
"""The file in a Trainer's ``default_root_dir`` that holds the state of a standalone
``validate``/``test``/``predict`` run through the Batch API (one entry per pass)."""

STATE_VERSION = 1

ENDPOINT = "/v1/chat/completions"

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
"""Batch statuses that end polling."""

OPEN = frozenset({"creating", "submitted", "cancelling"})
"""Record statuses a run still has to settle (see :class:`BatchStore`)."""

NONCE_KEY = "afnio_batch"
"""The batch ``metadata`` key afnio sends a per-batch nonce under: how a batch created
by an interrupted run is found again (``batches.list``) instead of being sent twice."""

LIST_SCAN_LIMIT = 1000
"""The most batches ``batches.list`` is read for when looking for a batch whose
creation was interrupted (OpenAI lists the newest first)."""

# SDK-only arguments of ``chat.completions.create``: not part of a request body
_SDK_ONLY = ("timeout", "extra_headers", "extra_query", "extra_body")


class BatchDeferred(BaseException):
    """Raised by a chat call made while a :class:`BatchCollector` collects and whose
    answer is not known yet: the request is collected for the next batch. A
    ``BaseException``, so that a program's ``except Exception`` lets it through."""


class BatchFailed(RuntimeError):
    """Requests that went through ``max_attempts`` batches without an answer (or a
    pass that needed more than ``max_rounds`` rounds)."""


class BatchTimeout(BatchFailed):
    """A batch was polled for ``BatchOptions.poll_timeout`` seconds without ending.
    Its id stays in the state: running the pass again resumes polling it."""


class BatchClientNotFound(RuntimeError):
    """A batch of the saved state was submitted by a client (base URL and account)
    that no chat call of the pass uses now, so it can be neither polled nor
    cancelled."""


@dataclass(frozen=True)
class BatchOptions:
    """How a pass uses the Batch API.

    Args:
        poll_interval: seconds between two ``batches.retrieve`` of a running batch.
        max_attempts: batches an item may go through; a failed item is sent again in
            the next round's batch until then, after which :class:`BatchFailed`.
        max_rounds: the most rounds (batches of dependent calls, retries included)
            a pass may take.
        completion_window: the batch window (OpenAI accepts only ``"24h"``).
        metadata: the batch ``metadata`` (string values; afnio adds its nonce under
            :data:`NONCE_KEY`, so at most 15 entries of your own).
        answer_tokens: the completion tokens a request is projected to take, for the
            budget check before a batch is submitted (:func:`projected_cost`), when
            its body sets no ``max_completion_tokens``/``max_tokens`` (which win).
        poll_timeout: the most seconds one call of the pass polls a batch before it
            raises :class:`BatchTimeout` (``None``: no limit). The default, 25 hours,
            is the 24-hour completion window plus an hour for ``finalizing``; the
            batch's id stays in the state, so running the pass again resumes
            polling it without paying again.
        cancel_timeout: the most seconds a stale batch (one the pass no longer
            needs) is polled after ``batches.cancel`` to see it end and account what
            it was billed (``None``: no limit). OpenAI ends a cancelled batch within
            about 10 minutes; after the default 20 minutes it is logged as
            ``"unaccounted"`` (its cost is not counted) and the pass goes on.
        abandon_unmatched: a saved batch that no client of the pass matches (another
            base URL, API key, organization or project) raises
            :class:`BatchClientNotFound` by default; ``True`` stops tracking it with a
            warning instead (it is neither cancelled nor counted in the cost).
    """

    poll_interval: float = 30.0
    max_attempts: int = 3
    max_rounds: int = 32
    completion_window: str = "24h"
    metadata: Mapping[str, str] | None = None
    answer_tokens: int = 256
    poll_timeout: float | None = 25 * 3600.0
    cancel_timeout: float | None = 1200.0
    abandon_unmatched: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.poll_interval, bool) or not self.poll_interval >= 0:
            raise ValueError(
                f"`poll_interval` must be seconds >= 0, got {self.poll_interval!r}."
            )
        for name in ("poll_timeout", "cancel_timeout"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value >= 0
            ):
                raise ValueError(
                    f"`{name}` must be seconds >= 0 or None (no limit), got {value!r}."
                )
        for name, low in (("max_attempts", 1), ("max_rounds", 1), ("answer_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        if self.metadata is not None and NONCE_KEY in self.metadata:
            raise ValueError(
                f"`metadata` must not set {NONCE_KEY!r}: afnio sends its batch nonce "
                "under that key."
            )

    @classmethod
    def of(cls, value: bool | BatchOptions | None) -> BatchOptions | None:
        """``True``: the defaults; ``False``/``None``: no Batch API; an instance."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        raise TypeError(
            f"`batch_api` must be True, False or a BatchOptions, got {value!r}."
        )


# -- collecting -----------------------------------------------------------------------


@dataclass
class _Pending:
    client: _OpenAIClient
    body: dict[str, Any]
    phase: str


def _request_body(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body a batch line carries for a ``chat.completions.create`` call."""
    body = {k: v for k, v in payload.items() if k not in _SDK_ONLY}
    extra = payload.get("extra_body")
    if isinstance(extra, Mapping):
        body.update(extra)
    try:
        json.dumps(body)
    except (TypeError, ValueError) as e:
        raise TypeError(
            "A chat call made through the Batch API must be plain JSON (a batch line "
            f"is a JSON body): {e}. Pass `response_format` as a dict, not a class, "
            "or run the pass without batch_api."
        ) from None
    return body


def _endpoint(client: _OpenAIClient) -> str:
    """The client's base URL as it may be stored and logged: its password and
    credential query parameters masked (:func:`afnio._secrets.mask_url`)."""
    return mask_url(str(client.client.base_url))


def _client_ref(client: _OpenAIClient) -> str:
    """Which endpoint and account a batch belongs to, as it is stored: a SHA-256 of
    the full base URL (password included) and the client's account fingerprint
    (API key, organization, project, credential headers; itself a hash). Two
    clients with the same ref poll, cancel and pay for the same batches."""
    material = "\0".join(
        ("afnio-batch-client", str(client.client.base_url), client._cache_account())
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class BatchCollector:
    """The answers known so far and the requests collected in this pass (thread-safe;
    used by the chat calls of afnio's OpenAI clients while :func:`collecting`)."""

    def __init__(self, answers: Mapping[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self.answers: dict[str, str] = dict(answers or {})
        self.pending: dict[str, _Pending] = {}
        self.clients: dict[str, _OpenAIClient] = {}
        """Every client the pass made a chat call with (answered calls included), by
        endpoint and account (:func:`_client_ref`): the one that polls, cancels and
        pays for a saved batch of that endpoint and account."""

    @staticmethod
    def key(client: _OpenAIClient, body: Mapping[str, Any]) -> str:
        """The request's stable id: a hash of the endpoint, the account and the
        body (the same in every process)."""
        return cache_key(
            {
                "kind": "batch-chat",
                "base_url": str(client.client.base_url),
                "account": client._cache_account(),
                "request": body,
            }
        )

    def register(self, client: _OpenAIClient) -> None:
        """Note ``client`` as one of this pass's clients, so that a saved batch of
        its account is resumed (polled, accounted) with it even when every call of
        the pass is answered elsewhere (the response cache)."""
        with self._lock:
            self.clients.setdefault(_client_ref(client), client)

    def answer(self, client: _OpenAIClient, payload: Mapping[str, Any]) -> str:
        """The known answer to this chat call, or collect it and raise
        :class:`BatchDeferred`."""
        body = _request_body(payload)
        key = self.key(client, body)
        ref = _client_ref(client)
        with self._lock:
            self.clients.setdefault(ref, client)
            if key in self.answers:
                return self.answers[key]
            self.pending.setdefault(key, _Pending(client, body, current_phase()))
        raise BatchDeferred(key)


_COLLECTOR: contextvars.ContextVar[BatchCollector | None] = contextvars.ContextVar(
    "afnio_batch_collector", default=None
)


def active_collector() -> BatchCollector | None:
    """The collector of the pass running in this context, if any."""
    return _COLLECTOR.get()


@contextlib.contextmanager
def collecting(collector: BatchCollector) -> Iterator[BatchCollector]:
    """Collect the chat calls made in the block (and in the work it starts on afnio's
    loop, which inherits the context)."""
    token = _COLLECTOR.set(collector)
    try:
        yield collector
    finally:
        _COLLECTOR.reset(token)


# -- the same data every round --------------------------------------------------------


class ReplayLoader:
    """A view of ``loader`` that yields the same batches, in the same order, each time
    it is iterated: what a pass through the Batch API needs, since every round runs
    the pass again over its loader (:meth:`BatchRun.run`).

    A loader whose order changes from one epoch to the next would otherwise give
    each round other batches, so the requests collected in one round would not be
    those the next round makes (batches paid for nothing, answers mapped to other
    samples, a pass that never converges). The first iteration is the loader's own
    next epoch; later ones rewind the loader to where that epoch began:

    * a loader over a stream whose position can be saved (a
      :class:`~afnio.utils.data.DataLoader` of a
      :class:`~afnio.utils.data.JsonlDataset`, or any object with ``state_dict``/
      ``load_state_dict`` iterated directly): its state is taken right after the
      first ``iter()`` (the start of the epoch) and loaded again before every later
      one, so the dataset reads that same epoch again, from the start;
    * a map-style :class:`~afnio.utils.data.DataLoader` whose sampler has a state
      (``RandomSampler``): the sampler's state is taken before the first ``iter()``
      and loaded again before every later one (the same order is drawn);
    * anything else (a list, a sequential loader, a stream without a state) is
      iterated as it is: it must give the same batches every time.

    After the last round, the loader stands where one synchronous pass leaves it (an
    epoch counter advanced once, the sampler's generator moved by one epoch), so the
    epochs after the pass are those of a run without the Batch API.

    Build it once per pass, outside the function the rounds run (a new one would
    start a new epoch)::

        run = BatchRun(store, options)
        replay = ReplayLoader(val_loader)
        metrics = run.run(lambda: evaluate(agent, replay))
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._iterations = 0
        self._state: Any = None
        self._mode = self._mode_of(loader)

    @staticmethod
    def _mode_of(loader: Any) -> str | None:
        """``"stream"`` (save the loader's state after ``iter``), ``"sampler"`` (save
        the sampler's state before ``iter``) or ``None`` (iterate as it is)."""
        sampler = getattr(loader, "sampler", None)
        if getattr(loader, "iterable", False) is False and sampler is not None:
            if hasattr(sampler, "state_dict") and hasattr(sampler, "load_state_dict"):
                return "sampler"
            return None
        if not (hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")):
            return None
        dataset = getattr(loader, "dataset", None)
        if getattr(loader, "iterable", False) and not (
            hasattr(dataset, "state_dict") and hasattr(dataset, "load_state_dict")
        ):
            return None  # a DataLoader over a stream that cannot save its position
        return "stream"

    @property
    def rewinds(self) -> bool:
        """Whether later iterations are rewound (else they are the loader's own)."""
        return self._mode is not None

    def __iter__(self) -> Iterator[Any]:
        loader, first = self.loader, self._iterations == 0
        self._iterations += 1
        if self._mode == "sampler":
            if first:
                self._state = loader.sampler.state_dict()
            else:
                loader.sampler.load_state_dict(self._state)
            return iter(loader)
        if self._mode == "stream" and not first:
            loader.load_state_dict(self._state)
        iterator = iter(loader)
        if self._mode == "stream" and first:
            # the position at the start of the epoch just begun: later rounds
            # continue "the rest" of this epoch from there, i.e. all of it
            self._state = copy.deepcopy(loader.state_dict())
        return iterator

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __repr__(self) -> str:
        return f"ReplayLoader({self.loader!r})"


# -- state ----------------------------------------------------------------------------


def _empty_entry() -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "batches": [],
        "answers": {},
        "attempts": {},
        "errors": {},
        "cost": 0.0,
    }


class BatchStore:
    """Where a pass keeps its Batch API state: one entry (``name``) of a JSON file,
    written atomically after every change.

    The entry is ``{"version": 1, "batches": [{"id", "base_url", "client",
    "status", "nonce", "input_file_id", "items": {custom_id: [request key, model,
    phase]}, "accounted": [custom_id], "cost"}], "answers": {request key: text},
    "attempts": {request key: batches sent}, "errors": {request key: message},
    "cost": USD accounted}``.

    ``base_url`` is the endpoint with its password masked (``mask_url``) and
    ``client`` a SHA-256 of the full base URL and the account (see
    :func:`_client_ref`): no credential is stored. A record of an older afnio with
    the raw ``base_url`` and no ``client`` still loads: it is matched by that URL
    alone, and rewritten in the new form once matched.

    ``status`` is ``"creating"`` from the upload of the input file until
    ``batches.create`` answered (``id`` is ``None``; the batch carries ``nonce`` in
    its ``metadata``), ``"submitted"`` until the batch's results are downloaded and
    accounted (``"done"``), ``"cancelling"`` while a stale batch (one a later run no
    longer needed) is waited for after ``batches.cancel``, ``"cancelled"`` once what
    it was billed is accounted (``ended``: the provider's final status),
    ``"unaccounted"`` when it did not end within ``cancel_timeout`` or was not found,
    and ``"abandoned"`` when no client matched it and ``abandon_unmatched`` was set
    (see :class:`BatchRun`). ``accounted`` lists the lines (``custom_id``) whose
    usage and cost were already counted: a download interrupted midway and resumed
    counts each line once."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.path = Path(path)
        self.name = name

    def _read_all(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise ValueError(
                f"{self.path} is not a Batch API state file ({e}); delete it to start "
                "the pass afresh (its batches would be paid again)."
            ) from None
        return data if isinstance(data, dict) else {}

    def load(self) -> dict[str, Any]:
        """The entry, or a new empty one."""
        entry = self._read_all().get(self.name)
        if not isinstance(entry, dict) or entry.get("version") != STATE_VERSION:
            return _empty_entry()
        return entry

    def save(self, entry: Mapping[str, Any]) -> None:
        from afnio.serialization import write_atomic

        data = self._read_all()
        data[self.name] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=1).encode("utf-8"))

    def clear(self) -> None:
        """Forget the entry (the pass completed); the file goes when it is empty."""
        data = self._read_all()
        if self.name not in data:
            return
        del data[self.name]
        if data:
            from afnio.serialization import write_atomic

            write_atomic(self.path, json.dumps(data, indent=1).encode("utf-8"))
        else:
            self.path.unlink(missing_ok=True)


class MemoryStore(BatchStore):
    """A :class:`BatchStore` kept in memory.

    Args:
        name: the pass's name.
        entry: a state to start from (what an ``on_save`` kept elsewhere, e.g. in a
            checkpoint), or ``None`` for a new pass.
        on_save: called with a copy of the entry after every change, before the
            first poll of a submitted batch: where to keep it so that another
            process can resume (``Trainer.fit`` writes it into a checkpoint).
        path: what messages name as the state's place.
    """

    def __init__(
        self,
        name: str = "pass",
        *,
        entry: Mapping[str, Any] | None = None,
        on_save: Callable[[dict[str, Any]], None] | None = None,
        path: str | Path = "<memory>",
    ) -> None:
        super().__init__(Path(path), name)
        self._entry: dict[str, Any] | None = None
        self._on_save = on_save
        if isinstance(entry, Mapping) and entry.get("version") == STATE_VERSION:
            self._entry = json.loads(json.dumps(entry))

    def load(self) -> dict[str, Any]:
        if self._entry is None:
            return _empty_entry()
        return json.loads(json.dumps(self._entry))

    def save(self, entry: Mapping[str, Any]) -> None:
        self._entry = json.loads(json.dumps(entry))
        if self._on_save is not None:
            self._on_save(json.loads(json.dumps(entry)))

    def clear(self) -> None:
        self._entry = None


# -- the run --------------------------------------------------------------------------


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) off for the block, then raise it: the block's
    bookkeeping is done whole or not at all. Only in the main thread (the only one
    Python delivers signals to); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, Any]] = []
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(
            signal.SIGINT, lambda signum, frame: received.append((signum, frame))
        )
    except ValueError:  # not allowed here (an embedding interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):  # default_int_handler raises
            previous(*received[0])


def _sleep(seconds: float) -> None:
    """Wait between two polls (a module function, so tests can interrupt a poll)."""
    time.sleep(seconds)


def _account(client: _OpenAIClient, usage: Mapping[str, Any], cost: float) -> None:
    """Add one answered batch line to the client's usage and ``calls``: its tokens
    through ``update_usage`` (as a synchronous answer adds them, without a model
    name so that no synchronous cost is added), and its cost at the batch price
    into the client's exact running total (``_cost_total``, the one ``update_usage``
    adds to), so the total does not depend on the order lines are accounted in."""
    tokens = {k: v for k, v in usage.items() if k != "cost"}  # a cost would be *set*
    client.update_usage(tokens)
    with client._usage_lock:
        total = client._usage.setdefault("cost", {"amount": 0.0, "currency": "USD"})
        total["amount"] = client._cost_total.add(cost, total["amount"])
        client.calls += 1


def _text_of(content: Any) -> str:
    """The text of a message's ``content`` (a string, or a list of parts whose text
    parts count; an image part counts nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text") or "") for part in content if isinstance(part, Mapping)
        )
    return "" if content is None else str(content)


def projected_cost(
    body: Mapping[str, Any], provider: str = "openai", *, answer_tokens: int = 256
) -> float:
    """What one chat request is projected to cost through the Batch API, before it
    is sent: the prompt's tokens approximated as the dry-run estimates count them
    (:func:`afnio.trainer.estimate.approx_tokens` per message, plus
    ``MESSAGE_OVERHEAD_TOKENS``, plus ``tools``/``response_format`` as JSON), the
    answer's as the body's ``max_completion_tokens`` or ``max_tokens`` when set,
    else ``answer_tokens``; priced at the batch price of the pricing table (0 for
    an unpriced model)."""
    from afnio.models.pricing import calculate_cost, get_batch_price
    from afnio.trainer.estimate import MESSAGE_OVERHEAD_TOKENS, approx_tokens

    price = get_batch_price(str(body.get("model")), provider)
    if price is None:
        return 0.0
    prompt = 0
    for message in body.get("messages") or ():
        if isinstance(message, Mapping):
            prompt += approx_tokens(_text_of(message.get("content")))
        prompt += MESSAGE_OVERHEAD_TOKENS
    for extra in ("tools", "response_format"):
        if body.get(extra) is not None:
            prompt += approx_tokens(json.dumps(body[extra]))
    bound = body.get("max_completion_tokens") or body.get("max_tokens")
    completion = bound if isinstance(bound, int) and bound > 0 else answer_tokens
    return calculate_cost(
        {"prompt_tokens": prompt, "completion_tokens": completion}, price
    )


BudgetCheck = Callable[[float, int], None]
"""``budget(projected_usd, requests)``: called before a round's new batches are
submitted with their projected cost (:func:`projected_cost`, summed) and number of
requests; raise to refuse them (nothing is submitted)."""


@dataclass
class _Stats:
    rounds: int = 0
    batches_submitted: int = 0
    batches_resumed: int = 0
    batches_recovered: int = 0
    batches_cancelled: int = 0
    lines_answered: int = 0
    lines_failed: int = 0
    stale_lines: int = 0
    cost: float = 0.0
    batch_ids: list[str] = field(default_factory=list)


class BatchRun:
    """Run a pass through the Batch API, round by round (see the module docstring).

    Args:
        store: where the state is kept (a :class:`BatchStore` on a file to resume
            across processes).
        options: :class:`BatchOptions`.
        progress: show a rich progress bar while polling.
        label: the progress bar's title (``"Validation"``).
        budget: a :data:`BudgetCheck` called before each round's new batches are
            submitted (the Trainer's ``max_cost``); ``None``: no check.

    After :meth:`run`, :attr:`stats` holds the rounds, the batches submitted,
    resumed, recovered (created by an interrupted run and found again with
    ``batches.list``) and cancelled (stale), the lines answered and failed, the
    lines of stale batches accounted (``stale_lines``), and the cost accounted by
    this run (stale batches included); :attr:`prior_cost` the cost a resumed run's
    earlier process accounted.
    """

    def __init__(
        self,
        store: BatchStore,
        options: BatchOptions | None = None,
        *,
        progress: bool = False,
        label: str = "Batch API",
        budget: BudgetCheck | None = None,
    ) -> None:
        self.store = store
        self.options = options or BatchOptions()
        self.progress = progress
        self.label = label
        self.budget = budget
        self.stats = _Stats()
        self.prior_cost = 0.0

    # -- the public loop -------------------------------------------------------------

    def run(self, sweep: Callable[[], T]) -> T:
        """Run ``sweep`` (the pass) until it completes with every chat call answered;
        return its last result. ``sweep`` may catch :class:`BatchDeferred` around
        each unit of work it cannot finish yet (a Trainer batch) and go on with the
        others, so that one round collects the calls of every unit; one that escapes
        ``sweep`` just ends that run of it. ``sweep`` must go over the same data in
        the same order every time: iterate a :class:`ReplayLoader` of a loader
        whose order changes between epochs.

        Raises:
            BatchFailed: a request without an answer after ``max_attempts``
                batches, or more than ``max_rounds`` rounds.
            BatchTimeout: a batch polled for ``poll_timeout`` seconds (the state
                keeps it: run the pass again to resume).
            BatchClientNotFound: a saved batch no client of the pass matches.
        """
        state = self.store.load()
        self.prior_cost = float(state.get("cost") or 0.0)
        collector = BatchCollector(state["answers"])
        for _ in range(self.options.max_rounds + 1):
            collector.pending.clear()
            with collecting(collector):
                try:
                    result = sweep()
                except BatchDeferred:  # the whole pass is one unit of work
                    if not collector.pending:
                        raise
            if not collector.pending:
                # batches of an earlier run this pass no longer needs: paid all the
                # same, so they are settled (cancelled, accounted) before the state
                # goes
                self._settle_records(state, collector, {})
                self.store.clear()
                return result
            self.stats.rounds += 1
            self._settle(state, collector)
            collector.answers.update(state["answers"])
        raise BatchFailed(
            f"The pass still had unanswered LM calls after max_rounds="
            f"{self.options.max_rounds} rounds of batches. Are its requests the same "
            "from one run to the next (no random choice, no time in a prompt)? Raise "
            "BatchOptions(max_rounds=...) for a program with more dependent calls."
        )

    # -- one round -------------------------------------------------------------------

    def _settle(self, state: dict[str, Any], collector: BatchCollector) -> None:
        """Get an answer, or a failure, for every pending request: poll the stored
        batches that hold some, submit the rest (one batch per client)."""
        needed = dict(collector.pending)
        clients = {id(p.client): p.client for p in needed.values()}
        self._settle_records(state, collector, needed)
        remaining = {k: p for k, p in needed.items() if k not in state["answers"]}
        self._check_attempts(state, remaining)
        if self.budget is not None and remaining:
            provider = {id(c): c.provider or "openai" for c in clients.values()}
            projected = sum(
                projected_cost(
                    p.body,
                    provider[id(p.client)],
                    answer_tokens=self.options.answer_tokens,
                )
                for p in remaining.values()
            )
            self.budget(projected, len(remaining))  # raises to refuse: none sent
        submitted = []
        for client in clients.values():
            mine = {k: p for k, p in remaining.items() if p.client is client}
            if mine:
                submitted.append((self._submit(state, client, mine), client))
        for record, client in submitted:
            self._finish(state, record, client, needed)

    def _settle_records(
        self,
        state: dict[str, Any],
        collector: BatchCollector,
        needed: Mapping[str, _Pending],
    ) -> None:
        """Settle the saved batches still open: find a batch whose creation was
        interrupted, poll and account one that holds requests in ``needed``, and
        cancel, wait for and account one that holds none (stale)."""
        for record in list(state["batches"]):
            if record.get("status") not in OPEN:
                continue
            client = self._client_for(state, record, collector, needed)
            if client is None:  # abandoned (abandon_unmatched)
                continue
            if record["status"] == "creating" and not self._recover(
                state, record, client
            ):
                continue  # never created: its requests go into a new batch
            keys = {item[0] for item in record["items"].values()}
            # a batch whose download was interrupted after every answer was kept
            # is finished (its last lines accounted), not cancelled
            stale = not keys & needed.keys() and not keys <= state["answers"].keys()
            if record["status"] == "cancelling" or stale:
                # the pass no longer makes these calls (the program or data changed)
                self._retire(state, record, client)
                continue
            self.stats.batches_resumed += 1
            self._finish(state, record, client, needed)

    def _client_for(
        self,
        state: dict[str, Any],
        record: dict[str, Any],
        collector: BatchCollector,
        needed: Mapping[str, _Pending],
    ) -> _OpenAIClient | None:
        """The client of this pass that submitted ``record``'s batch (same base URL
        and account); a record of an older afnio (raw ``base_url``, no ``client``)
        is matched by its URL alone, then stored in the new form. ``None`` when it
        is abandoned (``abandon_unmatched``).

        Raises:
            BatchClientNotFound: no client of the pass matches it.
        """
        client = None
        for key, *_ in record["items"].values():
            if key in needed:  # the request key covers the endpoint and account
                client = needed[key].client
                break
        ref = record.get("client")
        if client is None and ref is not None:
            client = collector.clients.get(ref)
        if client is None and ref is None:  # an older afnio's record
            for candidate in collector.clients.values():
                if str(candidate.client.base_url) == record.get("base_url"):
                    client = candidate
                    break
        if client is not None:
            record["base_url"] = _endpoint(client)  # no password kept once matched
            record["client"] = _client_ref(client)
            return client
        shown = mask_url(str(record.get("base_url")))
        same_url = any(_endpoint(c) == shown for c in collector.clients.values())
        what = (
            "a client of this pass talks to that URL, but with another API key, "
            "organization or project (or URL password)"
            if same_url
            else "no client of this pass talks to that URL"
        )
        if self.options.abandon_unmatched:
            logger.warning(
                "Batch %s (%s) was submitted by a client this pass no longer uses "
                "(%s): it is not tracked any more (abandon_unmatched), neither "
                "cancelled nor counted in the cost; check it with the provider.",
                record.get("id") or f"being created ({record.get('input_file_id')})",
                shown,
                what,
            )
            record["status"] = "abandoned"
            record["base_url"] = shown
            self.store.save(state)
            return None
        raise BatchClientNotFound(
            f"Batch {record.get('id') or '(being created)'} of the Batch API state in "
            f"{self.store.path} was submitted to {shown} by a client that no chat call "
            f"of this pass uses now ({what}), so it can be neither polled nor "
            "cancelled. Run the pass with that client again (the same base_url, "
            "api_key, organization and project), so the batch is polled and paid "
            "once; or pass BatchOptions(abandon_unmatched=True) to stop tracking it "
            "(it is then neither cancelled nor counted in the cost: check it with "
            "the provider)."
        )

    def _check_attempts(
        self, state: dict[str, Any], items: Mapping[str, _Pending]
    ) -> None:
        """Raise :class:`BatchFailed` if a request already went through
        ``max_attempts`` batches."""
        attempts = state["attempts"]
        exhausted = [
            k for k in items if attempts.get(k, 0) >= self.options.max_attempts
        ]
        if exhausted:
            errors = state.get("errors", {})
            detail = "; ".join(
                f"{items[k].body.get('model')}: {errors.get(k, 'no answer')}"
                for k in exhausted[:3]
            )
            raise BatchFailed(
                f"{len(exhausted)} request(s) got no answer after max_attempts="
                f"{self.options.max_attempts} batches ({detail}). The state in "
                f"{self.store.path} keeps the answers paid so far."
            )

    # -- submitting ------------------------------------------------------------------

    def _submit(
        self, state: dict[str, Any], client: _OpenAIClient, items: dict[str, _Pending]
    ) -> dict[str, Any]:
        """Upload ``items`` and create their batch. A ``"creating"`` record (the
        uploaded file, the nonce the batch carries in its ``metadata``) is saved
        before ``batches.create``, so that a batch created by an interrupted call is
        found again (:meth:`_recover`) instead of being sent twice."""
        from afnio._runtime import run_sync

        lines = []
        records: dict[str, list[str]] = {}
        for key, pending in items.items():
            custom_id = f"afnio-{key[:40]}"
            records[custom_id] = [key, str(pending.body.get("model")), pending.phase]
            lines.append(
                json.dumps(
                    {
                        "custom_id": custom_id,
                        "method": "POST",
                        "url": ENDPOINT,
                        "body": pending.body,
                    },
                    ensure_ascii=False,
                )
            )
        data = ("\n".join(lines) + "\n").encode("utf-8")
        sdk = client.client
        # an upload interrupted before it is saved costs nothing (no batch uses it)
        upload = run_sync(
            sdk.files.create(file=("afnio_batch.jsonl", data), purpose="batch")
        )
        nonce = uuid.uuid4().hex
        record: dict[str, Any] = {
            "id": None,
            "base_url": _endpoint(client),
            "client": _client_ref(client),
            "status": "creating",
            "nonce": nonce,
            "input_file_id": upload.id,
            "items": records,
            "accounted": [],
            "cost": 0.0,
        }
        state["batches"].append(record)
        self.store.save(state)  # before the batch can exist
        metadata = {**(self.options.metadata or {}), NONCE_KEY: nonce}
        batch = run_sync(
            sdk.batches.create(
                input_file_id=upload.id,
                endpoint=ENDPOINT,
                completion_window=self.options.completion_window,  # type: ignore[arg-type]
                metadata=metadata,
            )
        )
        self._mark_submitted(state, record, batch.id)
        self.stats.batches_submitted += 1
        self.stats.batch_ids.append(batch.id)
        logger.info("Submitted batch %s (%d requests).", batch.id, len(items))
        return record

    def _mark_submitted(
        self, state: dict[str, Any], record: dict[str, Any], batch_id: str
    ) -> None:
        """``record``'s batch exists as ``batch_id``: count an attempt for each of
        its requests and save (the id is safe before the first poll)."""
        attempts = state["attempts"]
        for key, *_ in record["items"].values():
            attempts[key] = attempts.get(key, 0) + 1
        record["id"] = batch_id
        record["status"] = "submitted"
        self.store.save(state)

    def _recover(
        self, state: dict[str, Any], record: dict[str, Any], client: _OpenAIClient
    ) -> bool:
        """A ``"creating"`` record (a run interrupted around ``batches.create``):
        look for its batch with ``batches.list`` (its nonce in ``metadata``, or its
        input file), at most :data:`LIST_SCAN_LIMIT` batches, the newest first. When
        found, the record is ``"submitted"`` (``True``); else the batch was never
        created and the record is dropped (``False``): its requests go into a new
        batch."""
        from afnio._runtime import run_sync

        sdk = client.client
        nonce, file_id = record.get("nonce"), record.get("input_file_id")

        async def find() -> Any:
            seen = 0
            async for batch in sdk.batches.list(limit=100):
                metadata = batch.metadata or {}
                if (nonce and metadata.get(NONCE_KEY) == nonce) or (
                    file_id and batch.input_file_id == file_id
                ):
                    return batch
                seen += 1
                if seen >= LIST_SCAN_LIMIT:
                    return None
            return None

        found = run_sync(find()) if (nonce or file_id) else None
        if found is None:
            state["batches"].remove(record)
            self.store.save(state)
            logger.info(
                "A batch of %d requests whose creation was interrupted was never "
                "created: its requests go into a new batch.",
                len(record["items"]),
            )
            return False
        self._mark_submitted(state, record, found.id)
        self.stats.batches_recovered += 1
        logger.warning(
            "Found batch %s, created by an interrupted run before its id was saved: "
            "it is used, not sent again.",
            found.id,
        )
        return True

    # -- polling ---------------------------------------------------------------------

    def _poll(
        self,
        client: _OpenAIClient,
        record: dict[str, Any],
        limit: float | None,
        *,
        show: bool = False,
    ) -> Any:
        """Poll the batch until it ends or ``limit`` seconds passed (``None``: no
        limit); return the last batch object (its ``status`` says which). ``show``:
        a progress bar (when the run shows progress)."""
        from afnio._runtime import run_sync

        sdk = client.client
        total = len(record["items"])
        progress = task = None
        if show and self.progress:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                refresh_per_second=5,
                console=Console(),
            )
            progress.start()
            task = progress.add_task(
                f"[{self.label}: batch {record['id']}]", total=total, status=""
            )
        start = time.monotonic()
        try:
            while True:
                batch = run_sync(sdk.batches.retrieve(record["id"]))
                if progress is not None and task is not None:
                    counts = batch.request_counts
                    done = (counts.completed + counts.failed) if counts else 0
                    progress.update(task, completed=done, status=batch.status)
                if batch.status in TERMINAL:
                    return batch
                wait = self.options.poll_interval
                if limit is not None:
                    left = limit - (time.monotonic() - start)
                    if left <= 0:
                        return batch
                    wait = min(wait, left)
                _sleep(wait)
        finally:
            if progress is not None:
                progress.stop()

    def _wait(self, client: _OpenAIClient, record: dict[str, Any]) -> Any:
        """Poll the batch until it ends, with a progress bar.

        Raises:
            BatchTimeout: it did not end within ``poll_timeout`` (the state keeps
                its id: running the pass again resumes polling it).
        """
        limit = self.options.poll_timeout
        batch = self._poll(client, record, limit, show=True)
        if batch.status not in TERMINAL:
            raise BatchTimeout(
                f"Batch {record['id']} is still {batch.status!r} after {limit:g} s of "
                "polling (BatchOptions(poll_timeout=...)). Its id is kept in "
                f"{self.store.path}: run the pass again (the same method) to resume "
                "polling it without paying again, or raise poll_timeout (None: no "
                "limit)."
            )
        return batch

    # -- accounting ------------------------------------------------------------------

    def _lines(self, client: _OpenAIClient, batch: Any) -> Iterator[dict[str, Any]]:
        """The lines of the batch's output file, then of its error file."""
        from afnio._runtime import run_sync

        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            text = run_sync(client.client.files.content(file_id)).text
            for raw in text.splitlines():
                if raw.strip():
                    yield json.loads(raw)

    def _account_line(
        self,
        state: dict[str, Any],
        record: dict[str, Any],
        client: _OpenAIClient,
        custom_id: str,
        usage: Mapping[str, Any],
    ) -> None:
        """Count one answered line once: its usage and batch-price cost go to the
        client, the phase ledger (so a fit's spend log), the record, the state and
        the stats, and its ``custom_id`` into the record's ``accounted``."""
        _key, model, phase = record["items"][custom_id]
        cost = batch_cost_of(usage, model, client.provider or "openai")
        with _interrupts_held():  # all of it or none: a resume counts it once
            _account(client, usage, cost)
            LEDGER.record(model, usage, cost, phase=phase)
            record["accounted"].append(custom_id)
            record["cost"] = float(record.get("cost") or 0.0) + cost
            state["cost"] = float(state.get("cost") or 0.0) + cost
            self.stats.cost += cost

    def _finish(
        self,
        state: dict[str, Any],
        record: dict[str, Any],
        client: _OpenAIClient,
        needed: Mapping[str, _Pending],
    ) -> None:
        """Poll ``record``'s batch to its end, download and account its answers.

        Each line is accounted once: its ``custom_id`` goes into the record's
        ``accounted`` list as it is counted, and an interruption (Ctrl-C, an error)
        while the files are read saves the partial state before it propagates, so
        a resumed run skips the lines already counted."""
        batch = self._wait(client, record)
        errors = state.setdefault("errors", {})
        if batch.status != "completed":
            detail = ""
            if batch.errors is not None and batch.errors.data:
                detail = f": {batch.errors.data[0].message}"
            logger.warning(
                "Batch %s ended %s%s; its %d requests go into the next batch.",
                record["id"],
                batch.status,
                detail,
                len(record["items"]),
            )
            for key, *_ in record["items"].values():
                errors[key] = f"batch {batch.status}{detail}"
        accounted = set(record.setdefault("accounted", []))
        answered = failed = 0
        try:
            for line in self._lines(client, batch):
                custom_id = line.get("custom_id")
                item = record["items"].get(custom_id)
                if item is None:
                    continue
                key = item[0]
                response = line.get("response") or {}
                body = response.get("body") or {}
                if response.get("status_code") == 200 and body.get("choices"):
                    message = body["choices"][0].get("message") or {}
                    state["answers"][key] = message.get("content") or ""
                    errors.pop(key, None)
                    if custom_id in accounted:  # counted by an interrupted run
                        continue
                    self._account_line(
                        state, record, client, custom_id, body.get("usage") or {}
                    )
                    accounted.add(custom_id)
                    answered += 1
                else:
                    error = (body.get("error") or line.get("error") or {}) or {}
                    errors[key] = (
                        f"HTTP {response.get('status_code')}: "
                        f"{error.get('message', 'no answer')}"
                    )
                    failed += 1
        except BaseException:
            self.store.save(state)  # the lines counted so far are never counted again
            raise
        finally:
            self.stats.lines_answered += answered
            self.stats.lines_failed += failed
        if failed:
            logger.warning(
                "Batch %s: %d of %d requests failed; they go into the next batch.",
                record["id"],
                failed,
                len(record["items"]),
            )
        record["status"] = "done"
        self.store.save(state)

    # -- stale batches ---------------------------------------------------------------

    def _retire(
        self, state: dict[str, Any], record: dict[str, Any], client: _OpenAIClient
    ) -> None:
        """A stale batch (the pass no longer makes its requests): cancel it, wait
        (at most ``cancel_timeout``) until it ends, and account what the provider
        billed for it (the answered lines of its output file, at the batch price),
        without using its answers. A batch that already ended cannot be cancelled:
        its lines are accounted all the same."""
        import openai

        from afnio._runtime import run_sync

        if record["status"] != "cancelling":
            try:
                batch = run_sync(client.client.batches.cancel(record["id"]))
            except Exception as e:  # an ended batch, an endpoint without cancel
                logger.warning(
                    "Batch %s holds none of the requests this pass makes now; "
                    "cancelling it failed (%s): waiting for it to end to count what "
                    "it was billed (its answers are not used).",
                    record["id"],
                    e,
                )
            else:
                self.stats.batches_cancelled += 1
                logger.warning(
                    "Batch %s holds none of the requests this pass makes now (the "
                    "program or its data changed since it was submitted, or the "
                    "response cache answers them): cancelled "
                    "it (status %s); waiting for it to end to count what it was "
                    "billed (its answers are not used).",
                    record["id"],
                    batch.status,
                )
            record["status"] = "cancelling"
            self.store.save(state)
        limit = self.options.cancel_timeout
        try:
            batch = self._poll(client, record, limit)
        except openai.NotFoundError as e:  # gone, or another account's
            batch, reason = None, f"it was not found ({e})"
        else:
            reason = f"it did not end within cancel_timeout={limit} s"
        if batch is None or batch.status not in TERMINAL:
            record["status"] = "unaccounted"
            self.store.save(state)
            logger.warning(
                "Stale batch %s (%s): %s, so what the provider billed for it is NOT "
                "counted in this pass's cost; check it with the provider.",
                record["id"],
                record.get("base_url"),
                reason,
            )
            return
        accounted = set(record.setdefault("accounted", []))
        counted = 0
        try:
            for line in self._lines(client, batch):
                custom_id = line.get("custom_id")
                response = line.get("response") or {}
                body = response.get("body") or {}
                if (
                    custom_id not in record["items"]
                    or custom_id in accounted
                    or response.get("status_code") != 200
                    or not body.get("choices")
                ):
                    continue
                self._account_line(
                    state, record, client, custom_id, body.get("usage") or {}
                )
                accounted.add(custom_id)
                counted += 1
        except BaseException:
            self.store.save(state)  # the lines counted so far are never counted again
            raise
        finally:
            self.stats.stale_lines += counted
        record["status"] = "cancelled"
        record["ended"] = batch.status
        self.store.save(state)
        if counted:
            logger.warning(
                "Stale batch %s ended %s: %d of its lines were billed and are counted "
                "in the cost (%.6f USD at the batch price).",
                record["id"],
                batch.status,
                counted,
                record["cost"],
            )
