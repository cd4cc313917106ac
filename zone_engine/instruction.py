"""The instruction's check, apart from its encoding (`text.py`): torch-free, so `zone edit` and `zone demo`
refuse a bad instruction before the seconds that importing torch takes."""

from __future__ import annotations

import unicodedata

from .errors import InstructionError

MAX_TOKENS = 77
MAX_CHARACTERS = 10_000  # far beyond 77 CLIP tokens: anything longer is not an instruction


def check_instruction(instruction: object) -> str:
    """The instruction as a stripped string, or a clear InstructionError."""
    if not isinstance(instruction, str):
        raise InstructionError(f"the instruction must be text, got {type(instruction).__name__}")
    text = instruction.strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes the command line could not decode arrive as lone surrogates
        raise InstructionError("the instruction is not valid Unicode text (it holds a lone surrogate, as text "
                               "decoded with the wrong encoding does): check its source, such as the terminal's "
                               "encoding") from None
    if not text:
        raise InstructionError('the instruction is empty: say what to edit, e.g. "make the dog a golden statue"')
    if not any(_visible(character) for character in text):  # CLIP reads no word in it: an edit without a prompt
        raise InstructionError("the instruction has no visible characters (only control, zero-width or space "
                               'characters): say what to edit, e.g. "make the dog a golden statue"')
    if len(text) > MAX_CHARACTERS:
        raise InstructionError(
            f"the instruction is {len(text):,} characters long, over {MAX_CHARACTERS:,}; CLIP reads only {MAX_TOKENS} "
            "tokens, so keep it short"
        )
    return text


def _visible(character: str) -> bool:
    # Unicode's "other" (control, format such as zero-width spaces, unassigned, private use) and separators.
    return not character.isspace() and unicodedata.category(character)[0] not in "CZ"
