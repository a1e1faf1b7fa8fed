"""Hypothesis strategies for chats in the runtime's message format: random text (no special
token markup), tools whose JSON schemas use every construct Harmony renders (nested objects,
arrays, enums, type lists, oneOf, titles, examples, defaults, nullable), tool calls with string or
mapping arguments, tool results, analysis, multi-turn history."""

from hypothesis import strategies as st

SAFE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
text = st.text(SAFE, max_size=40).filter(lambda s: "<|" not in s)
name = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
scalar_default = st.one_of(st.integers(-1000, 1000), st.booleans(), st.none(), text, st.lists(st.integers(0, 9), max_size=3))

def _decorate(base):
    return st.builds(lambda b, d, t, e, n, dflt: {**b, **d, **t, **e, **n, **dflt}, base,
                     st.one_of(st.just({}), st.builds(lambda s: {"description": s}, text)),
                     st.one_of(st.just({}), st.just({}), st.builds(lambda s: {"title": s}, text)),
                     st.one_of(st.just({}), st.just({}), st.builds(lambda xs: {"examples": xs}, st.lists(text, max_size=2))),
                     st.one_of(st.just({}), st.just({"nullable": True})),
                     st.one_of(st.just({}), st.builds(lambda v: {"default": v}, scalar_default)))

leaf = st.one_of(
    st.builds(lambda t: {"type": t}, st.sampled_from(["string", "number", "integer", "boolean", "null", "weird"])),
    st.builds(lambda vs: {"type": "string", "enum": vs}, st.lists(text, min_size=1, max_size=3)),
    st.builds(lambda ts: {"type": ts}, st.lists(st.sampled_from(["string", "integer", "null", "boolean"]), min_size=1, max_size=3)),
    st.just({}),
)

def _extend(children):
    props = st.dictionaries(name, children, max_size=4)
    return st.one_of(
        st.builds(lambda c: {"type": "array", "items": c}, children),
        st.just({"type": "array"}),
        st.builds(lambda p, req: {"type": "object", "properties": p, "required": [k for k, r in zip(p, req) if r]},
                  props, st.lists(st.booleans(), min_size=4, max_size=4)),
        st.builds(lambda vs: {"oneOf": vs}, st.lists(children, min_size=1, max_size=3)),
    )

schema = st.recursive(_decorate(leaf), lambda c: _decorate(_extend(c)), max_leaves=8)
parameters = st.builds(lambda p, req, d: {"type": "object", "properties": p, "required": [k for k, r in zip(p, req) if r], **d},
                       st.dictionaries(name, schema, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4),
                       st.one_of(st.just({}), st.builds(lambda s: {"description": s}, text)))
tool = st.builds(lambda n, d, p: {"type": "function", "function": {"name": n, "description": d, **p}}, name,
                 st.one_of(text, st.text(SAFE, max_size=30).map(lambda s: s.replace("<|", "") + "\nsecond line\r\n"),
                           st.sampled_from(["\r", "a\rb", "\n", "a\n\nb\n\n", "x\r\n\r\ny"])),
                 st.one_of(st.just({}), st.builds(lambda p: {"parameters": p}, parameters)))

def call(names):
    args = st.one_of(text, st.dictionaries(name, st.one_of(text, st.integers(), st.booleans()), max_size=3))
    return st.builds(lambda n, a: {"type": "function", "function": {"name": n, "arguments": a}}, st.sampled_from(names), args)

@st.composite
def chats(draw):
    tools = draw(st.lists(tool, max_size=3, unique_by=lambda t: t["function"]["name"]))
    names = [t["function"]["name"] for t in tools] or ["lookup"]
    messages = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(text.filter(bool))})
    for _ in range(draw(st.integers(0, 4))):
        messages.append({"role": "user", "content": draw(text)})
        kind = draw(st.sampled_from(["final", "final", "calls", "none"]))
        thinking = draw(st.one_of(st.none(), text.filter(bool)))
        if kind == "final":
            m = {"role": "assistant", "content": draw(text)}
            if thinking:
                m["thinking"] = thinking
            messages.append(m)
        elif kind == "calls":
            calls = draw(st.lists(call(names), min_size=1, max_size=2))
            m = {"role": "assistant", "tool_calls": calls}
            if thinking:
                m["thinking"] = thinking
            messages.append(m)
            for _c in calls:
                messages.append({"role": "tool", "content": draw(text)})
            if draw(st.booleans()):
                m = {"role": "assistant", "content": draw(text)}
                if draw(st.booleans()):
                    m["thinking"] = draw(text.filter(bool))
                messages.append(m)
    chat = {"name": "generated", "messages": messages, "add_generation_prompt": draw(st.booleans())}
    if tools:
        chat["tools"] = tools
    effort = draw(st.sampled_from([None, "low", "medium", "high"]))
    if effort:
        chat["reasoning_effort"] = effort
    if draw(st.integers(0, 4)) == 0:
        chat["model_identity"] = draw(text.filter(bool))
    return chat
