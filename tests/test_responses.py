"""OpenAI's Responses API (``/v1/responses``) through the real server, driven by the official openai SDK
(``responses.create`` / ``responses.stream``) and by raw Codex-shaped requests.

The model's output is scripted through the server's token-source seam (see tests/test_server.py): the last
``[[tag]]`` in the prompt picks the native Kimi text the model "emits"; other requests sample the tiny random model.
Thinking output is scripted on the tiny checkpoint served with the K2.5-style thinking template
(tests/thinking_models.py), whose generation prompt opens ``<think>``.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from k2local.chat.toolcalls import ContentDelta
from k2local.tiny import default_tiny_path
from tests.test_server import CALL_TEXT, CONTEXT, KEY, TWO_CALLS, Served, _serve
from tests.thinking_models import K25_TEMPLATE, thinking_checkpoint

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
CLOCK = {"type": "function", "name": "get_time", "description": "Current time",
         "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    yield from _serve(default_tiny_path(), "kimi-k2-tiny")


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(thinking_checkpoint(tmp_path_factory.mktemp("k25r") / "ckpt", K25_TEMPLATE), "kimi-k25-tiny")


def sse_events(r: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of a raw SSE body."""
    out = []
    for block in r.text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln]
        if not lines:
            continue
        name = next((ln[7:] for ln in lines if ln.startswith("event: ")), "")
        data = json.loads("".join(ln[6:] for ln in lines if ln.startswith("data: ")))
        out.append((name, data))
    return out


def check_sequence(types: list[str], numbers: list[int]) -> None:
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete", "response.failed")


# ---------------------------------------------------------------------------------------------------- create

def test_plain_create(served: Served) -> None:
    served.script.outputs["hi"] = "Hello there!<|im_end|>"
    r = served.client.responses.create(model=served.model, input="Say hello [[hi]]")
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello there!"
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert msg.content[0].type == "output_text"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    prompt = served.script.last_prompt_with("hi")
    assert "<|im_user|>user<|im_middle|>Say hello [[hi]]<|im_end|>" in prompt
    assert prompt.endswith("<|im_assistant|>assistant<|im_middle|>")


def test_sampled_create_with_max_output_tokens(served: Served) -> None:
    r = served.client.responses.create(model=served.model, input=[{"role": "user", "content": "Tell me a story"}],
                                       max_output_tokens=3, temperature=0.8, top_p=0.9)
    assert r.usage.output_tokens <= 3
    assert r.max_output_tokens == 3 and r.top_p == pytest.approx(0.9)
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed"


def test_instructions_and_input_items(served: Served) -> None:
    served.script.outputs["ins"] = "Arr.<|im_end|>"
    r = served.client.responses.create(model=served.model, instructions="You are a pirate.", input=[
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Ahoy."}]},
        {"role": "user", "content": "Again [[ins]]"}])
    assert r.output_text == "Arr." and r.instructions == "You are a pirate."
    prompt = served.script.last_prompt_with("ins")
    assert prompt.startswith("<|im_system|>system<|im_middle|>You are a pirate.<|im_end|>")
    assert "Kimi" not in prompt  # the instructions replace the template's default system prompt
    assert ("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>Ahoy.<|im_end|>") in prompt


# ------------------------------------------------------------------------------------------------- streaming

def test_stream_accumulated_by_the_sdk(served: Served) -> None:
    served.script.outputs["st"] = "Streaming works fine.<|im_end|>"
    with served.client.responses.stream(model=served.model, input="Go [[st]]") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    check_sequence(types, [e.sequence_number for e in events])
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(d.delta for d in deltas) == "Streaming works fine."
    assert deltas[-1].snapshot == "Streaming works fine."  # the SDK's accumulator built the text
    first, last = types.index("response.output_text.delta"), len(types) - 1 - types[::-1].index(
        "response.output_text.delta")
    assert types[:first] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"]
    assert types[last + 1:] == ["response.output_text.done", "response.content_part.done",
                                "response.output_item.done", "response.completed"]
    assert final.output_text == "Streaming works fine." and final.status == "completed"
    assert final.id == events[0].response.id and final.usage.output_tokens > 0
    done = next(e for e in events if e.type == "response.output_item.done")
    assert done.item.id == final.output[0].id and done.item.status == "completed"


def test_stream_cut_by_max_output_tokens_is_incomplete(served: Served) -> None:
    served.script.outputs["long"] = "one two three four five six seven eight nine ten<|im_end|>"
    with served.client.responses.stream(model=served.model, input="[[long]]", max_output_tokens=2) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 2


# ------------------------------------------------------------------------------------------------------ tools

def test_tool_round_trip(served: Served) -> None:
    served.script.outputs["call"] = CALL_TEXT
    served.script.outputs["answer"] = "It is 18C in Paris.<|im_end|>"
    inputs: list = [{"role": "user", "content": "Weather in Paris? [[call]]"}]
    r = served.client.responses.create(model=served.model, input=inputs, tools=[WEATHER, CLOCK])
    assert [i.type for i in r.output] == ["message", "function_call"]
    assert r.output_text == "Let me check."
    call = r.output[1]
    assert call.call_id == "functions.get_weather:0" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.id.startswith("fc_")
    assert [t.name for t in r.tools] == ["get_weather", "get_time"] and r.tool_choice == "auto"
    prompt = served.script.last_prompt_with("call")
    assert "tool_declare" in prompt and '"name":"get_weather"' in prompt

    inputs += r.output  # the SDK's own output items, sent back as they are
    inputs.append({"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"})
    inputs.append({"role": "user", "content": "Thanks [[answer]]"})
    r2 = served.client.responses.create(model=served.model, input=inputs, tools=[WEATHER, CLOCK])
    assert r2.output_text == "It is 18C in Paris." and r2.status == "completed"
    prompt = served.script.last_prompt_with("answer")
    assert ("<|im_assistant|>assistant<|im_middle|>Let me check.<|tool_calls_section_begin|><|tool_call_begin|>"
            "functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|>"
            "<|tool_calls_section_end|><|im_end|>") in prompt
    assert "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n18C and sunny<|im_end|>" in prompt


def test_streamed_tool_call(served: Served) -> None:
    served.script.outputs["call"] = CALL_TEXT
    with served.client.responses.stream(model=served.model, input="Weather? [[call]]", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    check_sequence(types, [e.sequence_number for e in events])
    args = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(a.delta for a in args) == '{"city": "Paris"}'
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == '{"city": "Paris"}'
    call = final.output[-1]
    assert call.type == "function_call" and call.call_id == "functions.get_weather:0"
    assert call.parsed_arguments == {"city": "Paris"}  # a strict tool: the SDK parsed the arguments


def test_tool_choice_forms(served: Served) -> None:
    served.script.outputs["forced"] = "{\"city\": \"Oslo\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
    r = served.client.responses.create(model=served.model, input="[[forced]]", tools=[WEATHER, CLOCK],
                                       tool_choice={"type": "function", "name": "get_weather"})
    [call] = [i for i in r.output if i.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    served.script.outputs["plain"] = "No tools.<|im_end|>"
    r = served.client.responses.create(model=served.model, input="[[plain]]", tools=[WEATHER], tool_choice="none")
    assert r.output_text == "No tools."
    assert "tool_declare" not in served.script.last_prompt_with("plain")
    r = served.client.responses.create(model=served.model, input="[[plain]]", tools=[WEATHER, CLOCK], tool_choice={
        "type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_time"}]})
    prompt = served.script.last_prompt_with("plain")
    assert '"name":"get_time"' in prompt and "get_weather" not in prompt


def test_parallel_tool_calls_false_keeps_one_call(served: Served) -> None:
    served.script.outputs["two"] = TWO_CALLS
    r = served.client.responses.create(model=served.model, input="[[two]]", tools=[WEATHER])
    assert [i.call_id for i in r.output] == ["functions.get_weather:0", "functions.get_weather:1"]
    r = served.client.responses.create(model=served.model, input="[[two]]", tools=[WEATHER],
                                       parallel_tool_calls=False)
    [call] = r.output
    assert json.loads(call.arguments) == {"city": "Beijing"} and r.status == "completed"
    assert r.parallel_tool_calls is False


# ------------------------------------------------------------------------------------------- store, previous id

def test_previous_response_id_and_store(served: Served) -> None:
    served.script.outputs["first"] = "Noted: 42.<|im_end|>"
    served.script.outputs["second"] = "It was 42.<|im_end|>"
    r1 = served.client.responses.create(model=served.model, instructions="Old rules.",
                                        input="Remember 42 [[first]]")
    assert r1.store is True
    assert served.client.responses.retrieve(r1.id).output_text == "Noted: 42."
    r2 = served.client.responses.create(model=served.model, input="What was it? [[second]]",
                                        previous_response_id=r1.id)
    assert r2.output_text == "It was 42." and r2.previous_response_id == r1.id
    prompt = served.script.last_prompt_with("second")
    assert ("Remember 42 [[first]]<|im_end|><|im_assistant|>assistant<|im_middle|>Noted: 42.<|im_end|>"
            "<|im_user|>user<|im_middle|>What was it?") in prompt
    assert "Old rules." not in prompt  # instructions are not carried over

    r3 = served.client.responses.create(model=served.model, input="[[first]]", store=False)
    with pytest.raises(openai.NotFoundError):
        served.client.responses.retrieve(r3.id)
    with pytest.raises(openai.BadRequestError) as e:
        served.client.responses.create(model=served.model, input="x", previous_response_id=r3.id)
    assert e.value.body["code"] == "previous_response_not_found" and e.value.body["param"] == "previous_response_id"
    served.client.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        served.client.responses.retrieve(r1.id)


# ------------------------------------------------------------------------------------------------- Codex shape

CODEX_TOOLS = [  # Codex's tool kinds (kept small: the tiny model's context is 512 tokens)
    {"type": "function", "name": "shell", "description": "Run a command", "strict": False,
     "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                    "required": ["command"], "additionalProperties": False}},
    {"type": "function", "name": "update_plan", "description": "Update the plan", "strict": False,
     "parameters": {"type": "object", "properties": {}}},
    {"type": "custom", "name": "apply_patch", "description": "Apply a patch",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
    {"type": "web_search"},
    {"type": "local_shell"},
]
SHELL_CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.shell:2<|tool_call_argument_begin|>"
              "{\"command\": [\"ls\"]}<|tool_call_end|><|tool_call_begin|>functions.shell:3"
              "<|tool_call_argument_begin|>{\"command\": [\"pwd\"]}<|tool_call_end|><|tool_calls_section_end|>"
              "<|im_end|>")


def codex_body(served: Served, tag: str) -> dict:
    return {
        "model": served.model, "instructions": "You are Codex.", "stream": True, "store": False,
        "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "medium", "summary": "auto"},
        "tools": CODEX_TOOLS, "tool_choice": "auto", "parallel_tool_calls": False,
        "prompt_cache_key": "0b7e-session", "text": {"verbosity": "medium"}, "service_tier": None,
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "<permissions>rw</permissions>"}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "<env>cwd=/r</env>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": None,
             "encrypted_content": "gAAAAB-opaque-from-elsewhere"},
            {"type": "function_call", "name": "shell", "arguments": "{\"command\":[\"git\",\"status\"]}",
             "call_id": "functions.shell:0"},
            {"type": "function_call_output", "call_id": "functions.shell:0",
             "output": "{\"output\":\"clean\",\"metadata\":{\"exit_code\":0}}"},
            {"type": "function_call", "name": "view_image", "arguments": "{\"path\":\"a.png\"}",
             "call_id": "functions.view_image:1"},
            {"type": "function_call_output", "call_id": "functions.view_image:1",
             "output": [{"type": "input_text", "text": "a.png:"}, {"type": "input_image", "image_url": "data:,"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"Now ls [[{tag}]]"}]},
        ]}


def test_codex_shaped_request(served: Served) -> None:
    served.script.outputs["codex"] = SHELL_CALL
    r = served.post("/v1/responses", codex_body(served, "codex"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = sse_events(r)
    assert all(name == data["type"] for name, data in events)
    check_sequence([d["type"] for _, d in events], [d["sequence_number"] for _, d in events])
    done_items = [d["item"] for _, d in events if d["type"] == "response.output_item.done"]
    [call] = done_items  # parallel_tool_calls false: the second call is dropped
    assert call["type"] == "function_call" and call["call_id"] == "functions.shell:2"
    assert json.loads(call["arguments"]) == {"command": ["ls"]}
    completed = events[-1][1]["response"]
    assert completed["status"] == "completed" and completed["id"].startswith("resp_"), completed["usage"]
    assert completed["usage"]["input_tokens"] > 0 and completed["store"] is False
    assert [t["name"] for t in completed["tools"]] == ["shell", "update_plan"]
    prompt = served.script.last_prompt_with("codex")
    assert prompt.startswith("<|im_system|>tool_declare<|im_middle|>")
    assert "apply_patch" not in prompt and "web_search" not in prompt
    assert ("<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.shell:0"
            "<|tool_call_argument_begin|>{\"command\":[\"git\",\"status\"]}<|tool_call_end|>") in prompt
    assert "## Return of functions.shell:0\n{\"output\":\"clean\"" in prompt
    assert "## Return of functions.view_image:1\na.png:[an image or file was here" in prompt
    # store false: nothing kept
    assert httpx.get(served.url + "/v1/responses/" + completed["id"],
                     headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_codex_shaped_request_with_sdk(served: Served) -> None:
    """The same request through the SDK's stream accumulator (extra fields as extra_body)."""
    served.script.outputs["codex2"] = "Done listing.<|im_end|>"
    body = codex_body(served, "codex2")
    kw = {k: body.pop(k) for k in ("model", "instructions", "input", "tools", "tool_choice", "parallel_tool_calls",
                                   "store", "include", "reasoning", "prompt_cache_key")}
    body.pop("stream")
    with served.client.responses.stream(**kw, extra_body=body) as stream:
        final = stream.get_final_response()
    assert final.output_text == "Done listing." and final.status == "completed"


# -------------------------------------------------------------------------------------------------- reasoning

def test_reasoning_items(thinker: Served) -> None:
    thinker.script.outputs["think"] = "I should greet.</think>Hello there!<|im_end|>"
    r = thinker.client.responses.create(model=thinker.model, input="Hi [[think]]")
    assert [i.type for i in r.output] == ["reasoning", "message"]
    rs = r.output[0]
    assert rs.id.startswith("rs_") and rs.content[0].type == "reasoning_text"
    assert rs.content[0].text == "I should greet." and rs.summary == [] and rs.encrypted_content is None
    assert r.output_text == "Hello there!"
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens


def test_streamed_reasoning_and_sent_back(thinker: Served) -> None:
    thinker.script.outputs["think"] = "Plan: call.</think>Let me check." + CALL_TEXT.split("Let me check.")[1]
    thinker.script.outputs["after"] = "Sunny.</think>It is sunny.<|im_end|>"
    with thinker.client.responses.stream(model=thinker.model, input="Weather? [[think]]", tools=[WEATHER],
                                         include=["reasoning.encrypted_content"]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    check_sequence(types, [e.sequence_number for e in events])
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Plan: call."
    [rdone] = [e for e in events if e.type == "response.reasoning_text.done"]
    assert rdone.text == "Plan: call."
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call"]
    rs = final.output[0]
    assert rs.content[0].text == "Plan: call." and rs.encrypted_content

    # sent back as Codex keeps it (the encrypted content only): the template gets the reasoning again
    back = [{"role": "user", "content": "Weather? [[think]]"},
            {"type": "reasoning", "id": rs.id, "summary": [], "encrypted_content": rs.encrypted_content},
            *[i.model_dump(exclude_none=True) for i in final.output[1:]],
            {"type": "function_call_output", "call_id": final.output[2].call_id, "output": "sunny"},
            {"role": "user", "content": "So? [[after]]"}]
    r = thinker.client.responses.create(model=thinker.model, input=back, tools=[WEATHER])
    assert r.output_text == "It is sunny."
    prompt = thinker.script.last_prompt_with("after")
    assert "<|im_assistant|>assistant<|im_middle|><think>Plan: call.</think>Let me check." in prompt


def test_reasoning_effort_none_turns_thinking_off(thinker: Served) -> None:
    thinker.script.outputs["nothink"] = "Plain answer.<|im_end|>"
    r = thinker.client.responses.create(model=thinker.model, input="[[nothink]]", reasoning={"effort": "none"})
    assert [i.type for i in r.output] == ["message"] and r.output_text == "Plain answer."
    assert thinker.script.last_prompt_with("nothink").endswith("<think></think>")


# ------------------------------------------------------------------------------------------------ bad requests

BAD = [
    ({"input": 5}, "input"),
    ({}, "input"),
    ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input"),
    ({"input": [{"type": "telepathy"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": "hi", "tools": {"type": "function"}}, "tools"),
    ({"input": "hi", "tools": [{"type": "function", "name": "bad name!"}]}, "tools"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "temperature": 9}, "temperature"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}}, "text.format"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": "hi", "previous_response_id": "resp_missing"}, "previous_response_id"),
    ({"input": "hi", "background": True}, "background"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_requests_get_openai_errors(served: Served, case: int) -> None:
    extra, param = BAD[case]
    r = served.post("/v1/responses", {"model": served.model, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_sdk_errors(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        served.client.responses.create(model=served.model, input=[{"type": "telepathy"}])
    assert "telepathy" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        served.client.responses.create(model=served.model, input="word " * CONTEXT)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        served.client.responses.create(model="other-model", input="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).responses.create(
            model=served.model, input="hi")
    r = served.post("/v1/responses", "{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_sampled_stream_of_the_random_model(served: Served) -> None:
    with served.client.responses.stream(model=served.model, input="Hello", max_output_tokens=6) as stream:
        events = list(stream)
    types = [e.type for e in events]
    check_sequence(types, [e.sequence_number for e in events])
    final = events[-1].response
    assert final.usage.output_tokens <= 6
    assert types.count("response.output_item.added") == types.count("response.output_item.done") == len(final.output)


def test_failure_mid_stream_is_an_error_event_then_response_failed() -> None:
    """A request that fails after it started streaming (the worker's Failed): ``error``, then ``response.failed``
    with the open item marked incomplete."""
    from types import SimpleNamespace

    from k2local.server.requests import APIError
    from k2local.server.responses import _Items
    from k2local.server.worker import Failed

    req = SimpleNamespace(echo={"model": "m"}, parallel=True, encrypted=False)
    items = _Items(req, "resp_x", None, stream=True)  # type: ignore[arg-type]
    evs = items.start() + items.feed(ContentDelta("partial"))
    evs += items.feed(Failed(APIError(400, "too long", param="messages", code="context_length_exceeded")))
    types = [e["type"] for e in evs]
    assert types[-4:] == ["response.content_part.done", "response.output_item.done", "error", "response.failed"]
    assert evs[-2]["code"] == "context_length_exceeded" and evs[-2]["message"] == "too long"
    failed = evs[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "context_length_exceeded"
    assert failed["output"][0]["status"] == "incomplete" and failed["output"][0]["content"][0]["text"] == "partial"
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
