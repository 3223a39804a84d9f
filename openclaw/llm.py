"""The text edge of the engine, shared by the CLI, the chat and the server: messages in, streamed text out.

It resolves and loads a model, renders chat templates, detokenizes incrementally, splits reasoning from the
answer, closes thinking budgets and applies stop strings (calling Engine.finish when one is hit). Streams is
the live form (requests join and leave while decoding: the server's engine thread); LLM.stream and
LLM.generate run a fixed list. Deltas are plain data (counts, not the live Sequence), safe to hand to another
thread. It does not print; callers decide how text reaches the user.
"""

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from openclaw.config import EngineConfig, SamplingParams
from openclaw.engine.engine import Engine, pick_device
from openclaw.engine.sequence import Sequence
from openclaw.reasoning import THINK_CLOSE, ThinkSplitter, prompt_opens_thinking
from openclaw.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer
from openclaw.weights.hub import load_quantize, resolve_model


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    thinking: bool = False  # the prompt ends inside an open <think>: the output starts as reasoning
    think_budget: int | None = None  # reasoning tokens before </think> is injected; None = unbounded
    split_reasoning: bool = True  # False: raw text, <think> tags and all, in Delta.text (plain completions)


@dataclass
class Delta:
    """New text of request `index` (answer in text, thinking in reasoning); finish_reason is set on its last, and
    with finish_reason "error", error says why. Counts describe the request after this delta."""

    index: int
    text: str
    completion_tokens: int
    finish_reason: str | None = None
    reasoning: str = ""
    prompt_tokens: int = 0
    error: str | None = None
    input_error: bool = False  # the error is the request's own (an OpenClawError): a 4xx for the server
    kv_len: int = 0  # KV entries the sequence holds (prompt and output, less what was evicted)
    kv_capacity: int = 0  # pool slots it owns
    eviction: str | None = None  # once the sequence has evicted: one line on when and how (LLM.eviction_note)
    evictions: int = 0  # times its KV was compressed to the eviction budget so far


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    reasoning: str = ""
    error: str | None = None


class LLM:
    def __init__(self, config: EngineConfig, progress: Callable[[str, int, int], None] | None = None):
        # --quantize auto made concrete for this model and device: a GGUF file on a GPU stays in its blocks
        config = replace(config, quantize=load_quantize(config.model, config.quantize,
                                                        pick_device(config.device).type == "cuda"))
        self.config = config
        self.model_dir = resolve_model(config.model, config.cache_dir, progress=progress,
                                       quantized=config.quantize == "nf4", verify=config.verify)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.engine = Engine(self.model_dir, config, extra_eos=self.tokenizer.eos_ids, progress=progress)

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the chat template reads enable_thinking (Qwen3's does; most others ignore it)."""
        return "enable_thinking" in (self.tokenizer.chat_template or "")

    def chat_ids(self, messages: list[dict], **template_kwargs) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, **template_kwargs)

    def chat_request(self, messages: list[dict], params: SamplingParams, think: bool | None = None,
                     think_budget: int | None = None, tools: list[dict] | None = None) -> Request:
        """A Request for the reply to `messages`; think None leaves thinking to the template's default."""
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools, enable_thinking=think)
        return Request(self.tokenizer.encode(text), params, prompt_opens_thinking(text), think_budget)

    def close(self) -> None:
        """Persist what the session learned (the online eviction statistics); the LLM stays usable."""
        self.engine.close()

    def eviction_note(self, seq: Sequence) -> str | None:
        """One line on eviction in seq, for the user: when it started and how it keeps the KV range, or None when
        seq has not evicted."""
        if not seq.evictions:
            return None
        ev = self.engine.evict
        online = self.engine.compressor.online
        stats = "" if ev.scorer != "triattention" else (
            f"; statistics: online, {online.tokens:,} tokens" if online is not None else f"; statistics: {ev.stats}")
        name = "TriAttention" if ev.scorer == "triattention" else ev.scorer
        return (f"KV range of {seq.capacity} slots full after {seq.first_eviction:,} tokens: {name} eviction took "
                f"over, keeping {ev.budget} entries{stats} ({seq.evictions} compressions so far)")
    def text_request(self, text: str, params: SamplingParams) -> Request:
        """A Request that continues `text` as it stands, no chat template (a base model, `openclaw run --raw`): the
        tokenizer's own special tokens (BOS) added, as llama.cpp and transformers do for a plain prompt."""
        return Request(self.tokenizer.encode(text, add_special_tokens=True), params, split_reasoning=False)

    def streams(self) -> "Streams":
        return Streams(self)

    def stream(self, requests: list[Request]) -> Iterator[Delta]:
        """Decode all requests together; yields text deltas as they become safe to show (no half characters,
        no partial stop strings). Closing the generator aborts the unfinished sequences."""
        live = Streams(self)
        try:
            for r in requests:
                live.add(r)
            while live:
                yield from live.step()
        finally:
            live.close()

    def generate(self, requests: list[Request]) -> list[Completion]:
        texts, reasoning = [""] * len(requests), [""] * len(requests)
        done: dict[int, Delta] = {}
        for d in self.stream(requests):
            texts[d.index] += d.text
            reasoning[d.index] += d.reasoning
            if d.finish_reason:
                done[d.index] = d
        return [Completion(texts[i], len(r.prompt_ids), done[i].completion_tokens, done[i].finish_reason, reasoning[i],
                           done[i].error) for i, r in enumerate(requests)]


@dataclass
class _Live:
    request: Request
    seq: Sequence
    detok: IncrementalDetokenizer
    split: ThinkSplitter | None
    stop: StopChecker
    think_left: int | None


class Streams:
    """Requests decoded in one batch that may join (add) and leave (cancel) between steps.

    One thread owns it and the engine: add, cancel and step are not thread-safe. Keys count from 0 in add order.
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.engine = llm.engine
        self._live: dict[int, _Live] = {}
        self._keys = itertools.count()
        self._close_ids = llm.tokenizer.encode(f"\n{THINK_CLOSE}\n\n")

    def add(self, request: Request) -> int:
        """Queue a request; raises OpenClawError when it can never run (too long for the context or the pool)."""
        seq = self.engine.add_request(request.prompt_ids, request.params)
        key = next(self._keys)
        p = request.params
        self._live[key] = _Live(request, seq, IncrementalDetokenizer(self.llm.tokenizer,
                                                                     skip_special_tokens=p.skip_special_tokens),
                                ThinkSplitter(request.thinking) if request.split_reasoning else None,
                                StopChecker(p.stop, p.include_stop_str_in_output), request.think_budget)
        return key

    def cancel(self, key: int) -> None:
        """Abort a request (client gone, user pressed Ctrl-C); unknown or finished keys are ignored."""
        live = self._live.pop(key, None)
        if live is not None:
            self.engine.finish(live.seq, "abort")

    def close(self) -> None:
        """Abort every unfinished request."""
        for key in list(self._live):
            self.cancel(key)

    def __len__(self) -> int:
        return len(self._live)

    def sequence(self, key: int) -> Sequence | None:
        live = self._live.get(key)
        return live.seq if live else None

    def step(self) -> list[Delta]:
        """One engine step; a delta for each request with new text, and a last one (finish_reason set) each. An
        exception while turning one request's token into text ends that request alone, with finish_reason "error"."""
        by_seq = {live.seq.seq_id: key for key, live in self._live.items()}
        deltas = []
        for seq, token in self.engine.step():
            key = by_seq.get(seq.seq_id)
            if key is None:
                continue
            try:
                d = self._advance(key, token)
            except Exception as e:  # noqa: BLE001 (Engine.fail_on logs it; the other requests go on)
                self.engine.fail_on(seq, e)
                self._live.pop(key, None)
                d = _delta(key, seq, "", "", self.llm.eviction_note(seq))
            if d is not None:
                deltas.append(d)
        return deltas

    def _advance(self, key: int, token: int) -> Delta | None:
        live = self._live[key]
        seq, p = live.seq, live.seq.params
        # the scheduler ended seq at this token (eos or a stop token): its text is not part of the answer
        stop_token = seq.finish_reason == "stop" and not p.include_stop_str_in_output
        text = "" if token < 0 or stop_token else live.detok.push(token)  # -1: the step failed this sequence
        reasoning, answer = live.split.feed(text) if live.split else ("", text)
        if live.split and live.split.thinking and live.think_left is not None and not seq.finished:
            live.think_left -= 1
            if live.think_left <= 0 and self.engine.inject(seq, self._close_ids):
                live.think_left = None
                for t in self._close_ids:  # the injected tokens are text the user and the next turn see
                    r, a = live.split.feed(live.detok.push(t))
                    reasoning, answer = reasoning + r, answer + a
        hit = False
        if len(seq.output_ids) >= p.min_tokens:  # stop strings count only from min_tokens on
            answer, hit = live.stop.feed(answer)
        if hit:
            self.engine.finish(seq, "stop")
        elif seq.finished:
            r, a = _flush(live)
            tail, hit = live.stop.feed(a)
            reasoning, answer = reasoning + r, answer + tail + ("" if hit else live.stop.flush())
        if seq.finished:
            del self._live[key]
        if reasoning or answer or seq.finished:
            return _delta(key, seq, answer, reasoning, self.llm.eviction_note(seq))
        return None


def _delta(key: int, seq: Sequence, text: str, reasoning: str, eviction: str | None) -> Delta:
    return Delta(key, text, len(seq.output_ids), seq.finish_reason if seq.finished else None, reasoning,
                 seq.prompt_len, seq.error, seq.input_error, seq.kv_len, seq.capacity, eviction, seq.evictions)


def _flush(live: _Live) -> tuple[str, str]:
    """(reasoning, answer) held back by the detokenizer and the splitter, once the sequence has ended."""
    rest = live.detok.flush()
    if live.split is None:
        return "", rest
    r, a = live.split.feed(rest)
    r2, a2 = live.split.flush()
    return r + r2, a + a2
