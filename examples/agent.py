"""A tool-calling agent on a pack of local models: ``ChatPackLLM`` + ``langchain.agents.create_agent``.

    python examples/agent.py                              # default expert pack, else tiny random members
    python examples/agent.py --model ./a --model ./b      # members of your own (one model family)
    python examples/agent.py --question "Weather in Oslo?" --first-call any

Tool calls are decoded under a JSON-schema constraint, so every call the agent makes parses and matches the
tool's arguments, whatever the members. ``--first-call any`` forces a tool call on the first turn (useful
with small models that seldom choose one on their own); later turns are free to answer. Without the
``langchain`` package installed, a minimal ``bind_tools`` + ``ToolMessage`` loop runs instead.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from langchain_packllm import ChatPackLLM


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"It is sunny and 21 C in {city}."


def default_members() -> list[str]:
    """The default expert pack if this install has one, else tiny random members (a smoke test only)."""
    try:
        from langchain_packllm.lab.pack import load_pack

        return [expert.path for expert in load_pack().experts]
    except (ImportError, AttributeError, TypeError):
        from langchain_packllm.testing import make_tiny_pack

        print("No expert pack loader here: using tiny random members (their answers are noise).")
        directory = tempfile.mkdtemp(prefix="packllm-agent-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        return make_tiny_pack(directory)


def run_with_create_agent(chat: ChatPackLLM, question: str, first_call: str | None) -> list:
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def force_first_call(request, handler):
        if first_call and not any(isinstance(m, ToolMessage) for m in request.messages):
            request = request.override(tool_choice=first_call)
        return handler(request)

    agent = create_agent(chat, tools=[get_weather], middleware=[force_first_call])
    return agent.invoke({"messages": [HumanMessage(question)]}, {"recursion_limit": 8})["messages"]


def run_minimal_loop(chat: ChatPackLLM, question: str, first_call: str | None, max_turns: int = 3) -> list:
    messages: list = [HumanMessage(question)]
    tools = {"get_weather": get_weather}
    for turn in range(max_turns):
        reply = chat.bind_tools(list(tools.values()), tool_choice=first_call if turn == 0 else None).invoke(
            messages
        )
        messages.append(reply)
        if not reply.tool_calls:
            break
        messages.extend(tools[call["name"]].invoke(call) for call in reply.tool_calls)
    return messages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help="member path or hub id (repeat for each member)")
    parser.add_argument("--question", default="What is the weather in Paris?")
    parser.add_argument("--first-call", choices=["any", "auto"], default="any", help="tool_choice on turn 1")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    chat = ChatPackLLM.from_model_ids(
        args.model or default_members(),
        device=args.device,
        max_tokens=args.max_tokens,
        constrained_max_tokens=128,
    )
    first_call = None if args.first_call == "auto" else args.first_call
    try:
        messages = run_with_create_agent(chat, args.question, first_call)
    except ImportError:
        messages = run_minimal_loop(chat, args.question, first_call)
    for m in messages:
        if isinstance(m, AIMessage) and m.tool_calls:
            print(f"ai -> tool calls: {[(c['name'], c['args']) for c in m.tool_calls]}")
            print(f"     weights: {m.response_metadata.get('weights')}")
        else:
            print(f"{m.type}: {m.content!r}")


if __name__ == "__main__":
    main()
