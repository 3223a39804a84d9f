"""The text edge of the engine, shared by the CLI and the server: messages in, streamed text out.

It resolves and loads a model, renders chat templates, detokenizes incrementally and applies stop strings
(calling Engine.finish when one is hit). It does not print; callers decide how text reaches the user.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from openclaw.config import EngineConfig, SamplingParams
from openclaw.engine import Engine
from openclaw.hub import resolve_model
from openclaw.sequence import Sequence
from openclaw.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Delta:
    """New text of request `index`; finish_reason is set on its last delta."""

    index: int
    text: str
    seq: Sequence
    finish_reason: str | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class LLM:
    def __init__(self, config: EngineConfig, progress: Callable[[str, int, int], None] | None = None):
        self.config = config
        self.model_dir = resolve_model(config.model, config.cache_dir, progress=progress)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.engine = Engine(self.model_dir, config, extra_eos=self.tokenizer.eos_ids)

    def chat_ids(self, messages: list[dict], **template_kwargs) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, **template_kwargs)

    def stream(self, requests: list[Request]) -> Iterator[Delta]:
        """Decode all requests together; yields text deltas as they become safe to show (no half characters,
        no partial stop strings). Closing the generator aborts the unfinished sequences."""
        seqs = [self.engine.add_request(r.prompt_ids, r.params) for r in requests]
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        detoks = [IncrementalDetokenizer(self.tokenizer) for _ in seqs]
        stops = [StopChecker(r.params.stop) for r in requests]
        try:
            while any(not s.finished for s in seqs):
                for seq, token in self.engine.step():
                    i = index[seq.seq_id]
                    text = "" if token in self.engine.eos_ids else detoks[i].push(token)
                    text, hit = stops[i].feed(text)
                    if hit:
                        self.engine.finish(seq, "stop")
                    elif seq.finished:
                        text += stops[i].feed(detoks[i].flush())[0] + stops[i].flush()
                    if text or seq.finished:
                        yield Delta(i, text, seq, seq.finish_reason if seq.finished else None)
        finally:
            for seq in seqs:
                self.engine.finish(seq, "abort")

    def generate(self, requests: list[Request]) -> list[Completion]:
        texts = [""] * len(requests)
        done: dict[int, Delta] = {}
        for d in self.stream(requests):
            texts[d.index] += d.text
            if d.finish_reason:
                done[d.index] = d
        return [Completion(texts[i], len(r.prompt_ids), len(done[i].seq.output_ids), done[i].finish_reason)
                for i, r in enumerate(requests)]
