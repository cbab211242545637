"""Chat templates (swarm/text.py) and a chat in turns (swarm/chat.py): rendered in a sandbox, replies that end
at the model's end-of-turn token and show only the assistant's text, trimming that drops the oldest
turns and keeps the system prompt; and once, the real default model through three peers.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.chat import Chat, Console, run_interactive, run_scripted
from swarm.decode.target import LocalModel
from swarm.text import ChatTemplate, TemplateError, end_of_turn_ids, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2-135M-Instruct's template (ChatML, a default system prompt), as its tokenizer_config.json has it
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
          "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
          "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
# the same shape for the tiny models: the bundled code model's tokenizer has <|endoftext|>, the random ones' <s> </s>
SHAPE = ("{% if messages[0]['role'] != 'system' %}BOSsystem\nYou are tiny.EOS\n{% endif %}"
         "{% for m in messages %}BOS{{ m['role'] }}\n{{ m['content'] }}EOS\n{% endfor %}"
         "{% if add_generation_prompt %}BOSassistant\n{% endif %}")
TINY = SHAPE.replace("BOS", "<s>").replace("EOS", "</s>")
CODE = SHAPE.replace("BOS", "<|endoftext|>").replace("EOS", "<|endoftext|>")


def test_chatml_renders_turns_with_the_default_system_prompt():
    t = ChatTemplate(CHATML, {"eos_token": "<|im_end|>"})
    assert t.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert t.render(turns, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n")


def test_templates_run_in_a_sandbox_with_the_usual_helpers():
    with pytest.raises(TemplateError, match="unsafe|access"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}).render([])
    with pytest.raises(TemplateError, match="roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}", {}).render([])
    with pytest.raises(TemplateError):
        ChatTemplate("{% for m in messages %}{% do messages.append(m) %}{% endfor %}", {}).render([{"role": "user"}])
    text = ChatTemplate("{{ bos_token }}{{ messages | tojson }} {{ strftime_now('%Y') | length }}", {"bos_token": "<s>"})
    assert text.render([{"role": "user", "content": "é"}]) == '<s>[{"role": "user", "content": "é"}] 4'


def templated(tmp_path: Path, config: dict | None = None, generation: dict | None = None, code: bool = False) -> Path:
    """A tiny model whose tokenizer_config.json carries `config` (a chat template, say): a random Llama
    (a context of 256 tokens), or with `code` a copy of the bundled code model (it writes text that decodes)."""
    from conftest import copy_of_tiny, make_checkpoint

    path = tmp_path / "model"
    if code:
        copy_of_tiny(path)
        special = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    else:
        make_checkpoint(path, "llama2")
        special = {"eos_token": "</s>", "bos_token": "<s>"}
    (path / "tokenizer_config.json").write_text(json.dumps({**special, **(config or {})}))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def test_where_a_template_and_the_end_of_turn_tokens_come_from(tmp_path):
    path = templated(tmp_path, generation={"eos_token_id": [1, 7]})
    tok = load_tokenizer(path)
    assert ChatTemplate.load(path, tok) is None  # no template: raw continuation
    assert end_of_turn_ids(path, tok) == (1, 7)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": TINY}]}))
    assert ChatTemplate.load(path, tok).render([{"role": "user", "content": "x"}]).endswith("<s>assistant\n")
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert ChatTemplate.load(path, tok).render([{"role": "user", "content": "x"}]) == "x!"
    from swarm.bundled import TINY_MODEL

    assert ChatTemplate.load(TINY_MODEL, load_tokenizer(TINY_MODEL)) is None


def test_a_chat_in_turns_shows_only_the_assistants_text(tmp_path):
    path = templated(tmp_path, {"chat_template": CODE}, code=True)
    tok = load_tokenizer(path)
    chat = Chat(LocalModel.load(path), tok, max_new_tokens=12, template=ChatTemplate.load(path, tok))
    shown: list[str] = []
    first = chat.reply("def f(x):\n", on_text=shown.append)
    assert "".join(shown) == first and first.strip() and "<|endoftext|>" not in first
    assert chat.turns == [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": first}]
    chat.reply("class A:\n")
    rendered = chat.template.render([*chat.turns[:3]])  # the second prompt: both turns before it, re-rendered
    assert chat.history[:len(tok.encode(rendered, add_special_tokens=False).ids)] == \
        tok.encode(rendered, add_special_tokens=False).ids
    chat.set_system("Be brief.")
    assert chat.turns == [] and chat.history == [] and chat.system == "Be brief."
    chat.reply("x = 1\n")
    assert tok.decode(chat.history, skip_special_tokens=False).startswith("<|endoftext|>system\nBe brief.<|endoftext|>")


def test_a_reply_ends_at_an_end_of_turn_token_only_generation_config_names(tmp_path):
    """generation_config.json may name end-of-turn tokens that config.json does not: the reply ends there."""
    path = templated(tmp_path, {"chat_template": CODE}, code=True)
    tok, model = load_tokenizer(path), LocalModel.load(path)
    free = Chat(model, tok, max_new_tokens=12, template=ChatTemplate.load(path, tok))
    free.reply("def f(x):\n")
    tokens = free.history[-free.stats.tokens:]
    stop = next(t for t in tokens[2:] if t not in tokens[:2] and t > 0)  # a token the reply reaches after a few
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, stop]}))
    chat = Chat(model, tok, max_new_tokens=12, template=ChatTemplate.load(path, tok))
    text = chat.reply("def f(x):\n")
    upto = tokens.index(stop)
    assert text == tok.decode(tokens[:upto], skip_special_tokens=True)
    assert chat.history[-1] == stop and chat.stats.tokens == upto + 1


def test_trimming_drops_the_oldest_turns_and_keeps_the_system_prompt(tmp_path):
    path = templated(tmp_path, {"chat_template": TINY})  # a context of 256 tokens: 240 for the prompt
    tok = load_tokenizer(path)
    out = io.StringIO()
    chat = Chat(LocalModel.load(path), tok, max_new_tokens=16, template=ChatTemplate.load(path, tok),
                system="Keep me.", console=Console(out, live=False))
    for i in range(4):
        chat.reply(f"for i in range({i}):\n    print(i * i)\n" * 6)
    note = [line for line in out.getvalue().splitlines() if line.startswith("(conversation trimmed")]
    assert note and all("the model's context is 256)" in line for line in note), out.getvalue()
    assert chat.turns[0]["role"] == "user" and len(chat.turns) < 12
    assert tok.decode(chat.history, skip_special_tokens=False).startswith("<s>system\nKeep me.</s>")
    assert len(chat.history) <= 256


def test_the_repl_sets_a_system_prompt(tmp_path, monkeypatch):
    path = templated(tmp_path, {"chat_template": CODE}, code=True)
    tok = load_tokenizer(path)
    chat = Chat(LocalModel.load(path), tok, max_new_tokens=4, template=ChatTemplate.load(path, tok))
    lines = iter(["def f(x):", "/system Answer in Python.", "/stats"])
    monkeypatch.setattr("builtins.input", lambda prompt="": _next(lines))
    out = io.StringIO()
    run_interactive(chat, out)
    assert "Type a message. /system TEXT /reset /stats /quit" in out.getvalue()
    assert "(system prompt set; conversation forgotten)" in out.getvalue()
    assert chat.system == "Answer in Python." and chat.turns == [] and "1 replies, " in out.getvalue()


def _next(lines):
    try:
        return next(lines)
    except StopIteration:
        raise EOFError from None


@pytest.mark.timeout(900)
def test_the_default_model_answers_with_code_through_three_peers():
    """`swarm demo` as shipped: SmolLM2-135M-Instruct (fetched and converted once per machine, into the
    usual cache), three local peers, the prompt piped in; the reply is ChatML's assistant text only."""
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "demo", "--max-new-tokens", "64"], cwd=ROOT,
                         input="Write a Python function that reverses a string.\n", capture_output=True, text=True,
                         timeout=880)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "serves blocks 20:30" in out.stderr, out.stderr[-3000:]  # 30 blocks over three peers
    reply = out.stdout.split(">>> Write a Python function that reverses a string.\n", 1)[1]
    assert "```" in reply and "def " in reply, out.stdout
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply
    assert reply.count(" -> ") == 2, reply  # the route: three hops


@pytest.mark.timeout(600)
def test_the_default_model_keeps_a_two_turn_conversation():
    """The second question only makes sense with the first one in the context: the template re-renders
    both turns, so the model answers about Italy's capital, not a generic 'Italy'."""
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "chat", "--local", "--max-new-tokens", "32",
                          "--system", "Answer in one short sentence.",
                          "--prompt", "What is the capital of France?", "And of Italy?"],
                         cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = out.stdout.split(">>> And of Italy?", 1)
    assert "Paris" in first, out.stdout
    assert "Rome" in second, out.stdout


def test_piped_prompts_carry_out_the_chat_commands_and_quit_where_told(tmp_path):
    """A script (prompts piped in, or --prompt) is read as if typed: /system, /stats and /reset are commands,
    /quit ends the run there, and only the real prompts get replies."""
    path = templated(tmp_path, {"chat_template": CODE}, code=True)
    tok = load_tokenizer(path)
    chat = Chat(LocalModel.load(path), tok, max_new_tokens=4, template=ChatTemplate.load(path, tok))
    out = io.StringIO()
    run_scripted(chat, ["/system Answer in Python.", "def f(x):", "/stats", "/reset", "def g(y):", "/quit",
                        "never answered"], out)
    text = out.getvalue()
    assert "(system prompt set; conversation forgotten)" in text and "(conversation forgotten)" in text
    assert chat.stats.replies == 2 and "1 replies, " in text and ">>> never answered" not in text
    assert chat.system == "Answer in Python." and len(chat.turns) == 2  # the turns after /reset: one exchange
