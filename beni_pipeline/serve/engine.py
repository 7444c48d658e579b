"""Continuous batching: one thread steps every active sequence together, one token each per forward pass, and new
sequences join between steps.

The batch's KV cache is one DynamicCache whose rows are aligned on the right: the sequences that join at one step are
prefilled together, left-padded, then their cache is padded on the left to the batch's length (or the batch's to
theirs), with the attention mask zero over the padding and each row's positions its own, as generate does for a
left-padded batch. A finished or abandoned row leaves at once, and columns that no row needs any more are cut from
the left. Works for any causal LM whose cache is a DynamicCache of full-attention layers (beni models, their
quantized and LLaVA exports).
"""

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from beni_model.chat import pad_batch
from beni_model.evaluate import placement
from beni_model.modeling import BeniForConditionalGeneration

log = logging.getLogger("beni.serve")

PREFILL_TOKENS = 16384  # padded prompt tokens in one prefill pass: bounds its activations when many join at once


class Busy(Exception):
    """The waiting queue is full."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Sequence:
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    sampling: Sampling
    emit: Callable[[dict], None]  # called from the engine's thread: {"text": delta} ..., then {"finish": reason, ...} or {"error": ...}
    cancelled: bool = False  # set by the caller: the engine drops the sequence at its next step
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far, cut at a stop string
    sent: int = 0  # characters of `text` emitted
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 32, max_waiting: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.device, self.dtype = placement(model)
        # A beni model's decode steps skip the image merge: the LLM alone sees a text token.
        self.decoder = model.language_model if isinstance(model, BeniForConditionalGeneration) else model
        generation = getattr(model, "generation_config", None)
        self.eos = {tokenizer.eos_token_id} | set(_as_list(getattr(generation, "eos_token_id", None)))
        # Tokens generate never picks (a beni model's image token: generated, the next step would feed the LLM a placeholder).
        self.suppress = _as_list(getattr(generation, "suppress_tokens", None))
        self.waiting: deque[Sequence] = deque()
        self.wakeup = queue.SimpleQueue()
        self.stopping = False
        self.active: list[Sequence] = []
        self.joining: list[Sequence] = []  # taken from the queue, being prefilled
        self.steps = 0  # forward passes of the batch, for tests and metrics
        self.thread = threading.Thread(target=self._run, name="beni-engine", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- the caller's side (any thread)

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; raises Busy when `max_waiting` sequences already wait for a slot."""
        if self.stopping:
            raise Busy("the server is shutting down")
        if len(self.waiting) >= self.max_waiting:
            raise Busy(f"{len(self.waiting)} requests are waiting")
        if sequence.sampling.seed is not None:
            sequence.generator = torch.Generator(self.device).manual_seed(sequence.sampling.seed)
        self.waiting.append(sequence)
        self.wakeup.put(None)

    def load(self) -> dict:
        return {
            "active": len(self.active),
            "waiting": len(self.waiting),
            "max_batch": self.max_batch,
            "max_waiting": self.max_waiting,
            "steps": self.steps,
        }

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what still waits or runs ("the server is shutting down") and end the thread."""
        self.stopping = True
        self.wakeup.put(None)
        self.thread.join(timeout)

    # ---------------------------------------------------------------- the engine's thread

    def _run(self) -> None:
        cache, mask, logits = None, None, None
        while not self.stopping:
            if not self.active and not self.waiting:
                self.wakeup.get()
                continue
            try:
                with torch.inference_mode():
                    cache, mask, logits = self._admit(cache, mask, logits)
                    if self.active:
                        cache, mask, logits = self._step(cache, mask, logits)
            except Exception as e:  # a failed forward pass costs the batch its answers, never the server
                log.exception("generation failed")
                for sequence in self.active + self.joining:
                    sequence.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
                self.active, self.joining, cache, mask, logits = [], [], None, None, None
        for sequence in self.active + self.joining + list(self.waiting):
            sequence.emit({"error": "the server is shutting down", "status": 503})
        self.active = []
        self.waiting.clear()

    def _admit(self, cache, mask, logits):
        """Prefill waiting sequences into the free slots, several per pass (left-padded, as generate pads a batch), and
        join them to the batch."""
        while self.waiting and len(self.active) < self.max_batch and not self.stopping:
            if not (group := self._take_group()):
                continue
            self.joining = group
            batch = pad_batch([s.input_ids for s in group], self.tokenizer.pad_token_id, padding_side="left")
            ids, row_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            positions = (row_mask.cumsum(-1) - 1).clamp(min=0)
            images = [s.pixel_values for s in group if s.pixel_values is not None]
            pixels = torch.cat(images).to(self.device, self.dtype) if images else None
            out = self.model(
                input_ids=ids, pixel_values=pixels, attention_mask=row_mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            if any(type(layer) is not DynamicLayer for layer in out.cache.layers):
                raise ValueError(
                    "The engine batches full-attention caches only, and this LLM's cache has sliding-window or other layers: serve a "
                    "model whose LLM uses full attention in every layer."
                )
            if cache is None:
                cache, mask, logits = out.cache, row_mask, out.logits[:, -1]
            else:
                cache, mask = _join(cache, mask, out.cache, row_mask)
                logits = torch.cat([logits, out.logits[:, -1]])
            self.active += group
            self.joining = []
        return cache, mask, logits

    def _take_group(self) -> list[Sequence]:
        """Waiting sequences for one prefill pass: as many as there are free slots, within PREFILL_TOKENS padded tokens."""
        group, width = [], 0
        while self.waiting and len(self.active) + len(group) < self.max_batch:
            sequence = self.waiting[0]
            wider = max(width, len(sequence.input_ids))
            if group and wider * (len(group) + 1) > PREFILL_TOKENS:
                break
            self.waiting.popleft()
            if not sequence.cancelled:
                group.append(sequence)
                width = wider
        return group

    def _step(self, cache, mask, logits):
        """Pick each row's next token, emit it, drop the rows that are done, and run one decode pass for the rest."""
        tokens = self._pick(logits.float())
        keep = [i for i, (sequence, token) in enumerate(zip(self.active, tokens)) if not self._advance(sequence, token)]
        if len(keep) < len(self.active):
            self.active = [self.active[i] for i in keep]
            if not keep:
                return None, None, None
            cache, mask = _select(cache, mask, keep)
            tokens = [tokens[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        token_ids = torch.tensor(tokens, device=self.device)[:, None]
        out = self.decoder(input_ids=token_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        self.steps += 1
        return out.cache, mask, out.logits[:, -1]

    def _pick(self, logits: torch.Tensor) -> list[int]:
        if self.suppress:
            logits[:, self.suppress] = -torch.inf
        tokens = logits.argmax(-1).tolist()
        for i, sequence in enumerate(self.active):
            s = sequence.sampling
            if s.temperature > 0:
                tokens[i] = _sample(logits[i] / s.temperature, s.top_p, sequence.generator)
        return tokens

    def _advance(self, sequence: Sequence, token: int) -> bool:
        """Add `token` to the sequence and emit the text it completes; True when the sequence is done."""
        if sequence.cancelled:
            return True
        s = sequence.sampling
        finish = None
        if token in self.eos:
            finish = "stop"
        else:
            sequence.tokens.append(token)
            text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(stop, max(0, len(sequence.text) - len(stop))) for stop in s.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif len(sequence.tokens) >= s.max_tokens:
                finish = "length"
            sequence.text = text
        # While a stop string may still be completing, or a character's bytes are still arriving, its start waits.
        hold = 0 if finish else max([len(stop) - 1 for stop in s.stop] + [0])
        ready = len(sequence.text) - hold
        if not finish and sequence.text.endswith("\ufffd"):
            ready = min(ready, len(sequence.text) - 1)
        if ready > sequence.sent:
            sequence.emit({"text": sequence.text[sequence.sent : ready]})
            sequence.sent = ready
        if finish:
            sequence.emit({"finish": finish, "completion_tokens": len(sequence.tokens) + (token in self.eos)})
        return finish is not None


def _sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full; the top token always stays
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


# ---------------------------------------------------------------- the batch's cache, rows aligned on the right


def _join(cache: DynamicCache, mask: torch.Tensor, row: DynamicCache, row_mask: torch.Tensor):
    """The batch's cache and mask with `row` added as its last row, both padded on the left to the longer length."""
    width = max(mask.shape[1], row_mask.shape[1])
    for layer, new in zip(cache.layers, row.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(new.keys, width)])
        layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(new.values, width)])
    return cache, torch.cat([_pad_left(mask, width), _pad_left(row_mask, width)])


def _select(cache: DynamicCache, mask: torch.Tensor, rows: list[int]):
    """The batch's cache and mask for `rows` alone, less the left columns that none of them uses."""
    index = torch.tensor(rows, device=mask.device)
    mask = mask[index]
    start = int((mask.sum(0) > 0).nonzero()[0])
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
    return cache, mask[:, start:]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence axis (the last for a mask, the second last for keys and values)."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
