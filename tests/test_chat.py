"""Chat input over gRPC (GenerateRequest.messages): rendered with the checkpoint's template, special tokens in the
rendered text as their ids, and template errors as INVALID_ARGUMENT."""
from __future__ import annotations

import grpc
import pytest

from scheduler_svc.chat import ChatTemplate, ChatTemplateError
from scheduler_svc.tokenizer import SentencePieceTokenizer
from shared.demo_checkpoint import CHAT_TEMPLATE
from tests.test_http_api import chat_request
from tests.test_integration import collect, generate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def sp_tok(demo_checkpoint) -> SentencePieceTokenizer:
    return SentencePieceTokenizer((demo_checkpoint / "tokenizer.model").read_bytes(), True, 1, [2])


def test_render_is_tinyllamas_format():
    text = ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>").render(MESSAGES)
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    no_prompt = ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>").render(MESSAGES, add_generation_prompt=False)
    assert no_prompt == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n"


def test_template_errors_and_sandbox():
    with pytest.raises(ChatTemplateError, match="roles are supported"):
        ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>").render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="failed"):  # the sandbox refuses to reach into Python
        ChatTemplate("{{ messages.__class__.__mro__ }}", "", "").render(MESSAGES)


def test_special_tokens_in_rendered_text_become_ids(sp_tok):
    ids = sp_tok.encode_rendered("<|user|>\nHi</s>\n<|assistant|>\n")
    assert ids.count(2) == 1 and 1 not in ids  # </s> is EOS's id; no BOS added (the template writes it if any)
    assert sp_tok.encode("Hi</s>") != sp_tok.encode_rendered("Hi</s>")  # a plain prompt keeps </s> as text


def test_grpc_messages_are_the_rendered_prompt(stub, sp_tok):
    ids = sp_tok.encode_rendered(ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>").render(MESSAGES))
    chat = collect(stub.Generate(chat_request(MESSAGES, max_tokens=8, temperature=0)))
    same = generate(stub, ids=ids, max_tokens=8, temperature=0)
    assert chat.prompt_tokens == len(ids) and chat.token_ids == same.token_ids and chat.text == same.text


@pytest.mark.parametrize("messages, message", [([{"role": "tool", "content": "x"}], "roles are supported"),
                                              ([], "must not be empty")])
def test_grpc_bad_messages_are_invalid_argument(stub, messages, message):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(chat_request(messages, max_tokens=4)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
