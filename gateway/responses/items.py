"""A response's input as items: kept as the request gave them, and listed a page at a time
(`GET /v1/responses/{id}/input_items`).

Pure: no I/O, no HTTP.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from gateway.responses.models import (
    FunctionCall,
    FunctionCallItem,
    FunctionCallOutput,
    FunctionCallOutputItem,
    InputItem,
    InputMessage,
    InputRefusal,
    InputText,
    MessageItem,
    OutputText,
    ResponseItem,
    ResponseItemList,
)
from protocol.errors import InvalidRequest


def input_items(input: str | Sequence[InputItem]) -> list[InputItem]:
    """A request's ``input`` as items, a string as one user message: what is stored to
    list it later."""
    if isinstance(input, str):
        return [InputMessage(role="user", content=input)]
    return list(input)


def _item_id(response_id: str, index: int, prefix: str) -> str:
    """The id of an input item that came without one: the same every time it is listed."""
    digest = hashlib.sha256(f"{response_id}\0{index}".encode()).hexdigest()
    return f"{prefix}_{digest[:48]}"


def listed_items(response_id: str, items: Sequence[InputItem]) -> list[ResponseItem]:
    """A response's input items as `GET /v1/responses/{id}/input_items` lists them, in
    input order. Each keeps the id the client gave it; one without (or whose id an earlier
    item already has, which would make it no cursor) gets one derived from the response's
    id and its index."""
    listed: list[ResponseItem] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        given = getattr(item, "id", None)
        if given is None or given in seen:
            given = None
        if isinstance(item, InputMessage):
            item_id = given or _item_id(response_id, index, "msg")
            listed.append(MessageItem(id=item_id, role=item.role, content=_parts(item)))
        elif isinstance(item, FunctionCallItem):
            item_id = given or _item_id(response_id, index, "fc")
            listed.append(
                FunctionCall(
                    id=item_id,
                    status="completed",
                    call_id=item.call_id,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        elif isinstance(item, FunctionCallOutputItem):
            item_id = given or _item_id(response_id, index, "fco")
            output = item.output if isinstance(item.output, str) else _text_parts(item.output)
            listed.append(FunctionCallOutput(id=item_id, call_id=item.call_id, output=output))
        else:  # refused when the response was created, so never stored
            continue
        seen.add(item_id)
    return listed


def _text_parts(parts: Iterable[Any]) -> list[InputText | InputRefusal]:
    return [part for part in parts if isinstance(part, InputText | InputRefusal)]


def _parts(message: InputMessage) -> list[InputText | InputRefusal | OutputText]:
    """A message's content as a list of parts; an assistant's text as `output_text`."""
    content = message.content
    parts: list[InputText | InputRefusal] = (
        [InputText(type="input_text", text=content)]
        if isinstance(content, str)
        else _text_parts(content)
    )
    if message.role != "assistant":
        return list(parts)
    return [OutputText(text=p.text) if isinstance(p, InputText) else p for p in parts]


def items_page(
    items: Sequence[ResponseItem],
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = 20,
    order: Literal["asc", "desc"] = "desc",
) -> ResponseItemList:
    """One page of ``items`` (in input order), as OpenAI pages lists: in ``order``, those
    after the item ``after`` and before the item ``before``; the first ``limit`` of them,
    or, when paging back with ``before`` alone, the ``limit`` nearest to it. ``has_more``:
    the page left some of those out. A cursor that names no item is a 400."""
    ordered = list(items) if order == "asc" else list(reversed(items))
    ids = [item.id for item in ordered]
    start = _position(ids, after, "after") + 1 if after is not None else 0
    end = _position(ids, before, "before") if before is not None else len(ordered)
    window = ordered[start:end]
    page = window[-limit:] if before is not None and after is None else window[:limit]
    return ResponseItemList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(page) < len(window),
    )


def _position(ids: list[str], cursor: str, param: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        raise InvalidRequest(
            f"No input item with id {cursor!r} in this response.", param=param
        ) from None
