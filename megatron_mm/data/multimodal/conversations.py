"""The conversation dialects users bring, read as one list of (role, text) turns.

A row's `conversations` is a list of turns in one of these forms (see DESIGN.md, "The JSONL
that users bring"); the forms may not be mixed within a row's list:

* LLaVA / ShareGPT: `{"from": "human"|"gpt", "value": ...}`
* the same keys with `"from": "user"|"assistant"`
* chat messages (MiniMind-V, transformers' chat templates): `{"role": "user"|"assistant", "content": ...}`

Each form may open with one system turn (`"from": "system"` or `"role": "system"`). Roles
are read as `system`, `user` and `assistant`; texts must be non-empty strings (a chat
message whose `content` is a list of parts is not read). Other keys of a turn are ignored.
The shards keep the row as written; the text formatter reads it through `conversation_turns`.
"""

from __future__ import annotations

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLE_NAMES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}
# (role key, text key) of each turn form
TURN_KEYS = (("from", "value"), ("role", "content"))


class TurnError(ValueError):
    """A conversation that cannot be read: the field at fault (e.g. `conversations[2].from`) and why."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


def _turn_keys(turn, i: int) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise TurnError(f"conversations[{i}]", 'must be an object with "from" and "value" '
                                               '(or "role" and "content")')
    for role_key, text_key in TURN_KEYS:
        if role_key in turn:
            return role_key, text_key
    raise TurnError(f"conversations[{i}]", 'has no "from" or "role"')


def conversation_turns(turns) -> list[tuple[str, str]]:
    """(role, text) of each turn, role in system/user/assistant; TurnError for a bad list."""
    if not isinstance(turns, list) or not turns:
        raise TurnError("conversations", "must be a non-empty list of turns")
    keys = _turn_keys(turns[0], 0)
    read: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        role_key, text_key = _turn_keys(turn, i)
        if (role_key, text_key) != keys:
            raise TurnError(f"conversations[{i}]", f'uses "{role_key}" but turn 0 uses "{keys[0]}" '
                                                   f"(one form a conversation)")
        name = turn[role_key]
        role = ROLE_NAMES.get(name) if isinstance(name, str) else None
        if role is None:
            raise TurnError(f"conversations[{i}].{role_key}",
                            f"unknown role {name!r} (human, user, gpt, assistant or system)")
        if role == SYSTEM and i > 0:
            raise TurnError(f"conversations[{i}].{role_key}", "a system turn may only open the conversation")
        text = turn.get(text_key)
        if not isinstance(text, str):
            raise TurnError(f"conversations[{i}].{text_key}", f"must be a string, got {type(text).__name__}")
        if not text.strip():
            raise TurnError(f"conversations[{i}].{text_key}", "empty")
        read.append((role, text))
    if not any(role == ASSISTANT for role, _ in read):
        raise TurnError("conversations", "no gpt/assistant turn (nothing to learn)")
    return read
