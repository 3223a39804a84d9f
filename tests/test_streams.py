"""Live batches on SmolLM2: requests joining mid-run, injected tokens, thinking budgets, stop strings, cancel."""

import pytest

from openclaw.config import EngineConfig, SamplingParams
from openclaw.engine.engine import Engine
from openclaw.llm import LLM, Request

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def llm_for(path) -> LLM:
    return LLM(EngineConfig(model=str(path), device="cpu", dtype="float32", kv_tokens=2048, max_seqs=4))


@pytest.fixture(scope="module")
def llm(smol_model_dir):
    return llm_for(smol_model_dir)


def ids(llm, text: str) -> list[int]:
    return llm.chat_ids([{"role": "user", "content": text}])


def test_request_joining_mid_run_decodes_as_alone(llm):
    a, b = ids(llm, "What is the capital of France?"), ids(llm, "Name a color.")
    alone = [llm.generate([Request(p, GREEDY)])[0].text for p in (a, b)]
    live = llm.streams()
    texts = {live.add(Request(a, GREEDY)): ""}
    for _ in range(4):
        for d in live.step():
            texts[d.index] += d.text
    texts[live.add(Request(b, GREEDY))] = ""
    while live:
        for d in live.step():
            texts[d.index] += d.text
    assert [texts[0], texts[1]] == alone
    assert llm.engine.pool.allocator.num_free == llm.engine.pool.num_slots


def test_cancel_frees_the_slots_and_others_go_on(llm):
    live = llm.streams()
    first, second = live.add(Request(ids(llm, "Hi"), GREEDY)), live.add(Request(ids(llm, "Hello"), GREEDY))
    live.step()
    live.cancel(first)
    assert len(live) == 1 and live.sequence(first) is None
    last = []
    while live:
        last += live.step()
    assert last[-1].index == second and last[-1].finish_reason == "length"
    assert llm.engine.pool.allocator.num_free == llm.engine.pool.num_slots


def test_injected_tokens_continue_like_a_prompt_that_held_them(smol_model_dir):
    engine = Engine(smol_model_dir, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024))
    prompt, forced = [1, 504, 3458, 282, 4649, 314], [30, 2, 11, 1500]
    seq = engine.add_request(prompt, GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.inject(seq, forced)
    while engine.has_work():
        engine.step()
    head = seq.output_ids[:3 + len(forced)]
    assert head[3:] == forced and len(seq.output_ids) == GREEDY.max_tokens
    again = engine.generate([prompt + head], SamplingParams(temperature=0, max_tokens=12 - len(head), ignore_eos=True))
    assert seq.output_ids[len(head):] == again[0].output_ids
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    assert not engine.inject(seq, forced)  # no room left in max_tokens: refused, nothing appended
    assert seq.num_tokens == len(prompt) + 1


def test_thinking_budget_closes_the_reasoning(smol_thinking_dir):
    llm = llm_for(smol_thinking_dir)
    msgs = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    params = SamplingParams(temperature=0, max_tokens=40)
    req = llm.chat_request(msgs, params, think_budget=8)
    assert req.thinking  # the template opened <think>: SmolLM2's first words are reasoning
    done = llm.generate([req])[0]
    assert done.reasoning and done.text, done
    assert "think>" not in done.reasoning and not done.text.startswith("\n")  # tags and template newlines cut
    assert len(llm.tokenizer.encode(done.reasoning)) <= 9
    unbounded = llm.generate([llm.chat_request(msgs, SamplingParams(temperature=0, max_tokens=20))])[0]
    assert unbounded.reasoning.startswith(done.reasoning) and unbounded.text == ""  # SmolLM2 never closes it
    off = llm.chat_request(msgs, params, think=False)
    assert not off.thinking and llm.generate([off])[0].reasoning == ""


def test_stop_strings_cut_the_answer(llm):
    base = llm.generate([Request(ids(llm, "What is the capital of France?"), GREEDY)])[0]
    word = base.text.split()[2]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[word])
    cut = llm.generate([Request(ids(llm, "What is the capital of France?"), params)])[0]
    assert cut.finish_reason == "stop" and base.text.startswith(cut.text) and word not in cut.text
