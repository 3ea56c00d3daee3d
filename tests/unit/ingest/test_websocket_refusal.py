"""How the middleware refuses a WebSocket handshake on a server without the denial response extension: by
closing it before accepting (the server then answers 403), with a close code that says why."""

from __future__ import annotations

from starlette.types import Message

from throttlex.ingest.middleware import _refuse_websocket


async def refusal(status: int, extensions: dict[str, object]) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await _refuse_websocket({"type": "websocket", "extensions": extensions}, send, status, "why", 7 if status == 429 else None)
    return sent


async def test_without_the_extension_a_refusal_closes_with_a_code_that_says_why() -> None:
    assert await refusal(401, {}) == [{"type": "websocket.close", "code": 1008, "reason": "why"}]  # policy violation
    assert await refusal(429, {}) == [{"type": "websocket.close", "code": 1013, "reason": "why"}]  # try again later
    assert await refusal(503, {}) == [{"type": "websocket.close", "code": 1013, "reason": "why"}]


async def test_with_the_extension_a_refusal_is_an_http_answer_with_its_status() -> None:
    start, body = await refusal(429, {"websocket.http.response": {}})
    assert (start["type"], start["status"], dict(start["headers"])[b"retry-after"]) == ("websocket.http.response.start", 429, b"7")
    assert body == {"type": "websocket.http.response.body", "body": b'{"error":"why","retry_after_s":7}'}
