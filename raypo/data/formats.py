"""TRL's preference formats, checked row by row and normalised to an explicit prompt.

Three shapes are accepted (the ones TRL's DPOTrainer reads):

- standard text: `prompt`, `chosen`, `rejected` are strings;
- conversational: `prompt` is a list of `{"role", "content"}` messages, `chosen` and `rejected`
  are the response messages (usually one assistant message);
- implicit-prompt conversational: no `prompt` column; `chosen` and `rejected` are whole
  conversations that share their opening messages. The prompt is their longest common prefix
  of messages (kept short enough that each response keeps at least one message, as TRL's
  `extract_prompt` does), the responses are the rest.

Everything downstream sees only the first two shapes, with every message reduced to exactly
`role` and `content` (other keys such as `name` are dropped: the chat templates we render with
read only these two, and Arrow needs one struct type per column).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from raypo.data.errors import DataError

STANDARD: Literal["standard"] = "standard"
CONVERSATIONAL: Literal["conversational"] = "conversational"
Format = Literal["standard", "conversational"]

COLUMNS = ("prompt", "chosen", "rejected")
# The roles of OpenAI-style chat data; anything else is most likely a typo ("assitant").
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

Message = dict[str, str]


def _show(value: Any, limit: int = 60) -> str:
    """The type and a short repr of a bad value, for error messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def normalize_rows(
    rows: Sequence[Mapping[str, Any]], columns: Iterable[str], source: str
) -> tuple[Format, dict[str, list]]:
    """Check `rows` and return their format and the columns prompt/chosen/rejected.

    `columns` are the columns the file declares (a Parquet schema) or uses (the union of
    the keys of JSON records); `source` names the file or hub dataset in error messages.
    Raises `DataError` naming the source, the column and the 0-based row of the first problem.
    """
    present = list(columns)
    missing = [c for c in ("chosen", "rejected") if c not in present]
    if missing:
        raise _missing_columns(source, missing, present, "")
    if not rows:
        raise DataError.at(source, None, None, "the dataset has no rows")

    first = rows[0].get("chosen")
    if isinstance(first, str):
        fmt: Format = STANDARD
        if "prompt" not in present:
            raise _missing_columns(
                source, ["prompt"], present,
                " (standard text data needs a prompt column; only conversational data, where "
                "chosen and rejected are message lists, may leave the prompt implicit)",
            )
    elif isinstance(first, list):
        fmt = CONVERSATIONAL
    else:
        raise DataError.at(
            source, "chosen", 0,
            f"expected a string (standard format) or a list of messages (conversational "
            f"format), got {_show(first)}",
        )

    explicit = "prompt" in present
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for i, row in enumerate(rows):
        if fmt == STANDARD:
            prompt, chosen, rejected = (_text(row, c, i, source) for c in COLUMNS)
        elif explicit:
            prompt = _messages(row, "prompt", i, source)
            chosen = _response(_messages(row, "chosen", i, source), "chosen", i, source)
            rejected = _response(_messages(row, "rejected", i, source), "rejected", i, source)
        else:
            prompt, chosen, rejected = _split_implicit(
                _messages(row, "chosen", i, source), _messages(row, "rejected", i, source),
                i, source,
            )
        out["prompt"].append(prompt)
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
    return fmt, out


def _missing_columns(source: str, missing: list[str], present: list[str], why: str) -> DataError:
    names = ", ".join(repr(c) for c in missing)
    have = ", ".join(repr(c) for c in present) or "none"
    return DataError.at(
        source, None, None, f"missing column(s) {names}{why}; present columns: {have}"
    )


def _text(row: Mapping[str, Any], column: str, i: int, source: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise DataError.at(
            source, column, i,
            f"expected a string (the data is in standard text format, as row 0 is), "
            f"got {_show(value)}",
        )
    if not value:
        raise DataError.at(source, column, i, "expected a non-empty string, got ''")
    return value


def _messages(row: Mapping[str, Any], column: str, i: int, source: str) -> list[Message]:
    value = row.get(column)
    if not isinstance(value, list):
        raise DataError.at(
            source, column, i,
            f"expected a list of {{'role', 'content'}} messages (the data is conversational, "
            f"as row 0 is), got {_show(value)}",
        )
    if not value:
        raise DataError.at(source, column, i, "expected a non-empty list of messages, got []")
    messages = []
    for k, message in enumerate(value):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError.at(
                source, column, i,
                f"message {k}: expected a dict with string 'role' and 'content', "
                f"got {_show(message)}",
            )
        if message["role"] not in ROLES:
            raise DataError.at(
                source, column, i,
                f"message {k}: unknown role {message['role']!r}; expected one of "
                f"{', '.join(sorted(ROLES))}",
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _response(messages: list[Message], column: str, i: int, source: str) -> list[Message]:
    """A response must open with the assistant (the chat template's generation prompt is the
    assistant header) and say something."""
    if messages[0]["role"] != "assistant":
        raise DataError.at(
            source, column, i,
            f"the response starts with a {messages[0]['role']!r} message; expected 'assistant'",
        )
    if not any(m["content"] for m in messages):
        raise DataError.at(source, column, i, "the response messages are all empty strings")
    return messages


def _split_implicit(
    chosen: list[Message], rejected: list[Message], i: int, source: str
) -> tuple[list[Message], list[Message], list[Message]]:
    """Prompt = the longest shared prefix of messages, leaving each response one message."""
    common = 0
    while common < min(len(chosen), len(rejected)) - 1 and chosen[common] == rejected[common]:
        common += 1
    if common == 0:
        raise DataError.at(
            source, "chosen", i,
            "no 'prompt' column and chosen and rejected share no opening message, so the "
            "prompt cannot be inferred; add a 'prompt' column",
        )
    return (
        chosen[:common],
        _response(chosen[common:], "chosen", i, source),
        _response(rejected[common:], "rejected", i, source),
    )
