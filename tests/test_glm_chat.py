"""GLM chat templates in OpenClaw's sandboxed renderer: a template in GLM-4.7's shape (tools in a system turn, a
namespace and a macro, past reasoning dropped before the last user turn, tool calls as <arg_key>/<arg_value>, tool
results as <|observation|>, thinking opened or closed by enable_thinking), the reasoning split that follows from its
prompt, and GLM-4-0414's shape (no thinking switch: the reasoning model always thinks)."""

import json

import pytest
from tiny_models import add_char_tokenizer

from openclaw.reasoning import ThinkSplitter, prompt_opens_thinking
from openclaw.server.tool_calls import parse_tool_calls, tool_dialect
from openclaw.tokenizer import Tokenizer

# written for these tests after GLM-4.7's published template: the same structure and jinja features, not its text
GLM47_LIKE = """[gMASK]<sop>
{%- if tools -%}<|system|>
# Tools
{% for tool in tools %}{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}Call a function as <tool_call>{function-name}<arg_key>{key}</arg_key><arg_value>{value}</arg_value></tool_call>
{%- endif -%}
{%- macro text(content) -%}{%- if content is string -%}{{ content }}{%- else -%}
{%- for part in content if part is mapping and part.type == 'text' -%}{{ part.text }}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}<|system|>{{ text(m.content) }}
{%- elif m.role == 'user' -%}<|user|>{{ text(m.content) }}
{%- elif m.role == 'assistant' -%}<|assistant|>
{%- set content = text(m.content) -%}
{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
{%- if '</think>' in content -%}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1] -%}{%- endif -%}
{%- if loop.index0 > ns.last_user and reasoning -%}<think>{{ reasoning.strip() }}</think>{%- else -%}</think>{%- endif -%}
{{ content.strip() }}
{%- for tc in m.tool_calls or [] -%}<tool_call>{{ tc.function.name }}
{%- for k, v in tc.function.arguments.items() -%}<arg_key>{{ k }}</arg_key><arg_value>
{{- v if v is string else v | tojson(ensure_ascii=False) }}</arg_value>{%- endfor -%}</tool_call>{%- endfor -%}
{%- elif m.role == 'tool' -%}<|observation|><tool_response>{{ m.content }}</tool_response>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>
{{- '</think>' if enable_thinking is defined and not enable_thinking else '<think>' -}}{%- endif -%}"""

# GLM-4-0414's shape: "<|role|>\\n" turns, no thinking switch (GLM-Z1 thinks without being asked)
GLM4_0414_LIKE = ("[gMASK]<sop>{% for m in messages %}{% if m.role == 'tool' %}<|observation|>\n{{ m.content }}"
                  "{% else %}<|{{ m.role }}|>\n{{ m.content }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture
def glm_dir(tmp_path):
    add_char_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": GLM47_LIKE}))
    return tmp_path


def test_thinking_on_and_off(glm_dir):
    tok = Tokenizer.from_dir(glm_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    on, off, default = (tok.render_chat(msgs, enable_thinking=t) for t in (True, False, None))
    assert on == default == "[gMASK]<sop><|system|>Be brief.<|user|>2+2?<|assistant|><think>"
    assert off == "[gMASK]<sop><|system|>Be brief.<|user|>2+2?<|assistant|></think>"
    assert prompt_opens_thinking(on) and not prompt_opens_thinking(off)
    split = ThinkSplitter(prompt_opens_thinking(on))  # the output then starts inside the reasoning
    reasoning, answer = zip(*(split.feed(c) for c in ["add", " them</th", "ink>4"]), split.flush())
    assert ("".join(reasoning), "".join(answer)) == ("add them", "4")
    assert tok.encode(off)[:2] == [tok.backend.token_to_id("[gMASK]"), tok.backend.token_to_id("<sop>")]


def test_a_tool_round_trip_renders_and_parses(glm_dir):
    tok = Tokenizer.from_dir(glm_dir)
    assert tool_dialect(tok.chat_template) == "glm45"
    answer = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key>" \
             "<arg_value>2</arg_value></tool_call>"
    _, [call] = parse_tool_calls(answer, "glm45", WEATHER)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "reasoning_content": "ask the tool",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": json.loads(
                    call["function"]["arguments"])}}]},
               {"role": "tool", "content": "sunny"}]
    text = tok.render_chat(history, tools=WEATHER)
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools\n" + json.dumps(WEATHER[0], ensure_ascii=False))
    # the call renders back exactly as the model wrote it; reasoning after the last user turn is kept
    assert ("<|user|>Weather in Paris?<|assistant|><think>ask the tool</think>" + answer
            + "<|observation|><tool_response>sunny</tool_response><|assistant|><think>") in text
    # a later user turn drops that reasoning
    later = tok.render_chat(history + [{"role": "assistant", "content": "Sunny."},
                                       {"role": "user", "content": "Thanks"}], tools=WEATHER)
    assert "ask the tool" not in later and "<|assistant|></think>Sunny.<|user|>Thanks" in later


def test_glm4_0414_template_has_no_switch_and_glm4_tool_format(tmp_path):
    add_char_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": GLM4_0414_LIKE}))
    tok = Tokenizer.from_dir(tmp_path)
    text = tok.render_chat([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert text == "[gMASK]<sop><|user|>\nhi<|assistant|>\n" and not prompt_opens_thinking(text)
    assert tool_dialect(tok.chat_template) == "glm4"
    _, [call] = parse_tool_calls('get_weather\n{"city": "Rome"}', "glm4", WEATHER)
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}
