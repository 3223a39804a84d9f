"""Tokenizer parity with transformers on SmolLM2's real tokenizer, chat templates, streaming text and stop strings."""

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, normalizers, processors

from openclaw.errors import OpenClawError
from openclaw.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "naïve café résumé — “quotes” ‘single’ …",
    "emoji 👋🏽 family 👨‍👩‍👧 flags 🇫🇷 and 🤖",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "def f(x):\n\treturn {'a': [1, 2.5e-3]}  # ok\n\n\r\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\u00a0nbsp\u200bzero-width",
    "",
]

# A template in the shape of Qwen3's: tools, reasoning, tool calls/responses, enable_thinking.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'
                    + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message.role != "system" %}
        {{- raise_exception('Unexpected message role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# The other helpers templates lean on: loop controls, strftime_now, tojson options, bos_token, dict literals.
HELPERS_TEMPLATE = r"""{{ bos_token }}Today: {{ strftime_now("%Y-%m-%d") }}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% if m.role == 'end' %}{% break %}{% endif %}
[{{ m.role | upper }}] {{ m.content | trim }}{% if m.name is defined %} by {{ m.name }}{% endif %}

{% endfor %}
{{ {'k': 'é <b>&</b>', 'n': [1, 2]} | tojson(indent=2) }}
{{ tools | tojson(sort_keys=true, separators=(',', ':')) }}
{% if extra_flag is defined %}flag={{ extra_flag }}{% endif %}
{% if enable_thinking is defined %}thinking={{ enable_thinking }}{% endif %}{{ eos_token }}"""

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city: <city> & 'country'",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Zürich, 東京"}},
                       "required": ["city"]},
    },
}]

QWEN3_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "Weather in Zürich?"},
     {"role": "assistant", "content": "", "reasoning_content": "need a tool",
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich <&>"}}}]},
     {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": '{"wind": "4 km/h"}'},
     {"role": "assistant", "content": "It is 21°C.", "tool_calls": None}],
]


@pytest.fixture(scope="module")
def smol(smol_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smol_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_smol(smol_tokenizer_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def _dir_with_template(tmp_path: Path, src: Path, template: str | list, **config) -> Path:
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"bos_token": "<|im_start|>", "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
              "pad_token": "<|endoftext|>", "chat_template": template, **config}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(smol, hf_smol, text):
    ids = smol.encode(text)
    assert ids == hf_smol.encode(text, add_special_tokens=False)
    assert smol.encode(text, add_special_tokens=True) == hf_smol.encode(text, add_special_tokens=True)
    for skip in (True, False):
        assert smol.decode(ids, skip_special_tokens=skip) == hf_smol.decode(ids, skip_special_tokens=skip)
    assert smol.decode(ids, skip_special_tokens=False) == text


def test_smol_metadata(smol, hf_smol):
    assert smol.vocab_size == len(hf_smol)
    assert smol.bos_id == hf_smol.bos_token_id
    assert smol.eos_ids == {hf_smol.eos_token_id}
    assert smol.chat_template == hf_smol.chat_template


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2? 🤔"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, in 日本語?"}],
])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_chat_matches_transformers(smol, hf_smol, messages, add_generation_prompt):
    ref = hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smol.render_chat(messages, add_generation_prompt=add_generation_prompt) == ref
    ref_ids = hf_smol.apply_chat_template(messages, tokenize=True, return_dict=False,
                                          add_generation_prompt=add_generation_prompt)
    ids = smol.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == ref_ids and ids.count(smol.bos_id) == ref_ids.count(smol.bos_id)


@pytest.mark.parametrize("messages", QWEN3_CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen3_style_template_matches_transformers(smol_tokenizer_dir, tmp_path, messages, tools, enable_thinking):
    d = _dir_with_template(tmp_path, smol_tokenizer_dir, QWEN3_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ref = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **extra)
    ours = Tokenizer.from_dir(d).render_chat(messages, tools=tools, enable_thinking=enable_thinking)
    assert ours == ref
    if tools:
        assert "Zürich, 東京" in ours and "<city> & 'country'" in ours  # tojson: no ASCII or HTML escaping
    if enable_thinking is False:
        assert ours.endswith("<think>\n\n</think>\n\n")


def test_template_helpers_match_transformers(smol_tokenizer_dir, tmp_path):
    d = _dir_with_template(tmp_path, smol_tokenizer_dir, HELPERS_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    messages = [{"role": "user", "content": "  a  ", "name": None}, {"role": "skip", "content": "hidden"},
                {"role": "assistant", "content": "b"}, {"role": "end", "content": "x"}, {"role": "user", "content": "z"}]
    ref = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, extra_flag=7)
    ours = Tokenizer.from_dir(d).render_chat(messages, add_generation_prompt=False, tools=TOOLS, extra_flag=7)
    assert ours == ref
    assert datetime.now().strftime("%Y-%m-%d") in ours and "hidden" not in ours and "[USER] z" not in ours


def test_chat_template_jinja_file_wins(smol_tokenizer_dir, tmp_path):
    d = _dir_with_template(tmp_path, smol_tokenizer_dir, "from config")
    (d / "chat_template.jinja").write_text("from file {{ messages[0].content }}")
    assert Tokenizer.from_dir(d).render_chat([{"role": "user", "content": "x"}]) == "from file x"


def test_named_templates_pick_tool_use(smol_tokenizer_dir, tmp_path):
    named = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools={{ tools | length }}"}]
    tok = Tokenizer.from_dir(_dir_with_template(tmp_path, smol_tokenizer_dir, named))
    user = [{"role": "user", "content": "x"}]
    assert tok.chat_template == "plain" and tok.render_chat(user) == "plain"
    assert tok.render_chat(user, tools=TOOLS) == "tools=1"


def test_template_errors_are_openclaw_errors(smol_tokenizer_dir, tmp_path):
    tok = Tokenizer.from_dir(_dir_with_template(tmp_path, smol_tokenizer_dir, QWEN3_TEMPLATE))
    with pytest.raises(OpenClawError, match="Unexpected message role: robot"):
        tok.render_chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(OpenClawError, match="empty"):
        tok.render_chat([])
    bad = Tokenizer.from_dir(_dir_with_template(tmp_path, smol_tokenizer_dir, "{% for m in messages %}{{ m }"))
    with pytest.raises(OpenClawError, match="does not parse"):
        bad.render_chat([{"role": "user", "content": "x"}])
    sandboxed = Tokenizer.from_dir(_dir_with_template(tmp_path, smol_tokenizer_dir, "{{ messages.append(1) }}"))
    with pytest.raises(OpenClawError):  # the immutable sandbox refuses to mutate inputs
        sandboxed.render_chat([{"role": "user", "content": "x"}])


def test_missing_files_and_template(smol_tokenizer_dir, tmp_path):
    with pytest.raises(OpenClawError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(smol_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)  # tokenizer.json alone is enough to encode
    assert tok.chat_template is None and tok.eos_ids == set() and tok.decode(tok.encode("ok")) == "ok"
    with pytest.raises(OpenClawError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_eos_ids_from_generation_config(smol_tokenizer_dir, tmp_path):
    d = _dir_with_template(tmp_path, smol_tokenizer_dir, "x")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [0, 4]}))
    assert Tokenizer.from_dir(d).eos_ids == {0, 2, 4}  # the list plus tokenizer_config's <|im_end|> (2)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_dir(d).eos_ids == {0, 2}


def _llama_style_dir(tmp_path: Path, post_bos: bool, add_bos_token: bool | None) -> Path:
    """A SentencePiece-like tokenizer (Metaspace spaces, byte fallback, Strip decoder) built with `tokenizers`."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for c in "▁abcdefghijklmnopqrstuvwxyzHW,.!é":
        vocab[c] = len(vocab)
    merges = [("▁", "w"), ("o", "r"), ("▁w", "or"), ("l", "d"), ("▁wor", "ld"), ("H", "e"), ("l", "l"), ("He", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = HFBackend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    if post_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"} | ({} if add_bos_token is None else {"add_bos_token": add_bos_token})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(("post_bos", "add_bos_token", "expect_bos"),
                         [(True, True, True), (True, None, True), (False, True, True), (False, False, False)])
def test_bos_added_once(tmp_path, post_bos, add_bos_token, expect_bos):
    tok = Tokenizer.from_dir(_llama_style_dir(tmp_path, post_bos, add_bos_token))
    ids = tok.encode("Hello world", add_special_tokens=True)
    assert ids.count(1) == int(expect_bos) and (ids[0] == 1) == expect_bos
    assert tok.encode("Hello world") == [i for i in ids if i != 1]


STREAM_TEXTS = ["Hello world, 👋🏽 and 🇫🇷!", "世界 und naïve café", "é👨‍👩‍👧é world", "🤖"]


def _stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kw)
    deltas = [detok.push(i) for i in ids]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer_byte_level(smol, text):
    ids = smol.encode(text)
    # the test only means something if some token alone is half a character
    assert any("\ufffd" in smol.decode([i]) for i in ids)
    for prompt in (None, smol.encode_chat([{"role": "user", "content": "hi 👋"}])):
        deltas = _stream(smol, ids, prompt_ids=prompt)
        assert "".join(deltas) == smol.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)
    with_specials = ids + [2] + smol.encode(" more")
    for skip in (True, False):
        deltas = _stream(smol, with_specials, skip_special_tokens=skip)
        assert "".join(deltas) == smol.decode(with_specials, skip_special_tokens=skip)


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer_sentencepiece_style(tmp_path, text):
    tok = Tokenizer.from_dir(_llama_style_dir(tmp_path, post_bos=True, add_bos_token=True))
    ids = tok.encode(text)
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)  # per-token decoding loses spaces/bytes
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_flushes_incomplete_tail(smol):
    ids = smol.encode("ok 👋")[:-1]  # cut the emoji's last byte
    deltas = _stream(smol, ids)
    assert not any("\ufffd" in d for d in deltas[:-1]) and "".join(deltas) == smol.decode(ids)


def _run_stop(stop: list[str], chunks: list[str]) -> tuple[str, bool]:
    checker, out = StopChecker(stop), []
    for chunk in chunks:
        text, hit = checker.feed(chunk)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + checker.flush(), False


@pytest.mark.parametrize(("stop", "chunks", "expected"), [
    (["STOP"], ["hello ST", "O", "P and more"], ("hello ", True)),
    (["STOP"], ["STOP right away"], ("", True)),
    (["STOP"], ["S", "T", "O", "P"], ("", True)),
    (["STOP"], ["no stop ", "here, ST", "OR"], ("no stop here, STOR", False)),
    (["STOP"], ["ends on a prefix ST"], ("ends on a prefix ST", False)),
    (["aab"], ["a", "a", "a", "b", "c"], ("a", True)),
    (["abcd", "bc"], ["xab", "cd"], ("x", True)),  # the stop that starts first wins
    (["</s>", "\n\n"], ["line\n", "\nnext"], ("line", True)),
    ([], ["anything"], ("anything", False)),
])
def test_stop_checker(stop, chunks, expected):
    assert _run_stop(stop, chunks) == expected


def test_stop_checker_holds_back_only_possible_prefixes():
    checker = StopChecker(["<|end|>"])
    assert checker.feed("a <") == ("a ", False)
    assert checker.feed("b") == ("<b", False)
    assert checker.feed("<|en") == ("", False)
    assert checker.feed("d|> tail") == ("", True)
    assert checker.feed("later") == ("", True) and checker.flush() == ""


@pytest.mark.parametrize("template, match", [
    ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "looped more than"),
    ("{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "looped more than"),
    ("{{ 'x' * 10**9 }}", "repeated 1000000000 times is too long"),
    ("{{ 7 ** 1000000000 }}", "too large a number"),
    ("{% for i in range(99999) %}{{ 'y' * 99999 }}{% endfor %}", "wrote more than"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "unsafe"),
    ("{{ messages.__class__.__base__.__subclasses__() }}", "unsafe"),
])
def test_runaway_and_escaping_templates_are_one_line_errors(smol_tokenizer_dir, tmp_path, template, match):
    """range(10**9) and recursion ended in raw tracebacks; loops, repetition and output now have budgets, and the
    sandbox keeps refusing escapes."""
    tok = Tokenizer.from_dir(_dir_with_template(tmp_path, smol_tokenizer_dir, template))
    with pytest.raises(OpenClawError, match=match) as e:
        tok.render_chat([{"role": "user", "content": "x"}])
    assert "\n" not in str(e.value) and str(e.value).startswith("the chat template of")


def test_budgets_leave_real_templates_alone(smol_tokenizer_dir, tmp_path):
    tok = Tokenizer.from_dir(_dir_with_template(tmp_path, smol_tokenizer_dir, QWEN3_TEMPLATE))
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 300}
            for i in range(2000)]
    text = tok.render_chat(long, tools=TOOLS)
    assert text.count("<|im_start|>") == 2002 and "turn 1999" in text  # 2000 turns, the system (tools) and the prompt


def test_a_lone_surrogate_is_a_one_line_error(smol):
    """JSON's "\\ud800" decodes to a string the Rust tokenizer refuses with a TypeError (the server closed the
    connection without a reply)."""
    with pytest.raises(OpenClawError, match=r"lone surrogate \('\\ud800' at character 3\)"):
        smol.encode("abc\ud800def")
    assert smol.decode(smol.encode("ok \U0001f916")) == "ok \U0001f916"  # a pair in JSON is one code point


def test_stop_checker_can_keep_the_stop_string():
    keep = StopChecker(["END", "STOP"], keep_stop=True)
    assert keep.feed("abc ST") == ("abc ", False)
    assert keep.feed("OP and more") == ("STOP", True) and keep.feed("x") == ("", True)
