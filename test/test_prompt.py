"""Prompt template and tokenizer rules (openvla-spec.md section 4)."""
import numpy as np
import pytest

from openvla_model.errors import InputError
from openvla_model.prompt import SPACE_TOKEN_ID, PromptTokenizer, build_prompt


def test_prompt_template_lowercases_the_instruction():
    assert build_prompt("Pick Up The RED Cup") == "In: What action should the robot take to pick up the red cup?\nOut:"


@pytest.fixture(scope="module")
def tok(tiny_weights):
    return PromptTokenizer(tiny_weights)


def test_bos_first_and_29871_appended_exactly_once(tok):
    ids = tok.encode_prompt("Pick up the red cup")
    assert ids[0] == 1 and ids[-1] == SPACE_TOKEN_ID
    assert int((ids == SPACE_TOKEN_ID).sum()) == 1
    assert int((ids == 1).sum()) == 1
    body = tok.tokenizer.encode(build_prompt("Pick up the red cup"), add_special_tokens=False).ids
    assert list(ids) == [1] + body + [SPACE_TOKEN_ID]
    assert 13 in ids  # "\n" is the byte-fallback token <0x0A>, as in Llama-2
    assert tok.decode(ids[1:-1]) == build_prompt("pick up the red cup")


def test_case_of_instruction_does_not_change_ids(tok):
    assert np.array_equal(tok.encode_prompt("OPEN THE DRAWER"), tok.encode_prompt("open the drawer"))


def test_29871_not_duplicated_when_the_tokenizer_already_ends_with_it(tok, monkeypatch):
    class Encoding:
        ids = [100, 200, SPACE_TOKEN_ID]

    class EndsWithSpace:
        def encode(self, text, add_special_tokens=False):
            return Encoding()

    monkeypatch.setattr(tok, "tokenizer", EndsWithSpace())
    assert list(tok.encode_prompt("x")) == [1, 100, 200, SPACE_TOKEN_ID]


@pytest.mark.parametrize("bad", ["", "   ", None, 3, "x" * 5000])
def test_bad_instructions_are_rejected(tok, bad):
    with pytest.raises(InputError):
        tok.encode_prompt(bad)
