"""Serving the app to the public safely: what Gradio 6 leaves open, closed around it, and (in
`serving.runner`) one model shared by every user. No science here and no layout: app.py wires the
page and calls these.

- `event_wanted()`: whether the Gradio event this thread works for still has someone waiting
  (the runner stops cancelled work at its next step).
- `guard_queue(demo, ...)`: checks on every request that joins the queue: a limit per client,
  short session ids, a sentence (not a bare 500 or `error: null`) for an unknown endpoint or
  missing values, and refusals while the server drains.
- `BodyLimit` and `app_kwargs()`: request bodies over a size refused before they are read whole;
  an unknown endpoint name answered with a sentence.
- `drain(demo, seconds)`: on SIGTERM, refuse new work, let running work finish, then return.
"""

from __future__ import annotations

import inspect
import ipaddress
import re
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from gradio.context import LocalContext
from gradio.route_utils import FnIndexInferError
from starlette.middleware import Middleware

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the browser sends ~11 characters, gradio_client a uuid
RESTARTING = "The server is restarting: try again in a minute."


def _finishing(blocks) -> frozenset | None:
    """While the server drains: the events that were running when it began (they may finish)."""
    return getattr(blocks, "_circuitbreaker_finishing", None)


def event_wanted() -> bool:
    """Whether the Gradio event the current worker thread runs for is still wanted. Gradio 6 frees a
    cancelled event's queue slot (and drops a closed page's events) but lets its thread run on, holding
    the model: the runner asks this at every step boundary and stops work nobody waits for. Outside an
    event (start-up, tests, notebooks) everything is wanted. Reads Gradio's queue (6.31 names)."""
    event_id = LocalContext.event_id.get(None)
    queue = getattr(LocalContext.blocks.get(None), "_queue", None)
    if event_id is None or queue is None:
        return True
    event = queue.event_ids_to_events.get(event_id)
    return event is not None and event.alive and not getattr(event, "closed", False)


def refusal() -> str | None:
    """The sentence for the current event if it must not start: the server is draining and this event
    was still waiting when the drain began. None otherwise (and outside events)."""
    finishing = _finishing(LocalContext.blocks.get(None))
    event_id = LocalContext.event_id.get(None)
    return RESTARTING if finishing is not None and event_id is not None and event_id not in finishing else None


def client_address(request) -> str | None:
    """Who sent a request: the peer's address, or, behind a proxy on a private or loopback address
    (a Hugging Face Space), the first address the proxy forwarded for."""
    peer = request.client.host if request is not None and request.client else None
    forwarded = request.headers.get("x-forwarded-for") if request is not None else None
    try:
        behind_proxy = peer is not None and (ipaddress.ip_address(peer).is_private or ipaddress.ip_address(peer).is_loopback)
    except ValueError:
        behind_proxy = False
    return forwarded.split(",")[0].strip() if behind_proxy and forwarded else peer


def endpoints(blocks) -> list[str]:
    """The public endpoint names, as gradio_client spells them."""
    return sorted(f"/{fn.api_name}" for fn in blocks.fns.values() if fn.api_name and fn.api_visibility == "public")


def _unknown_endpoint(blocks, name) -> HTTPException:
    return HTTPException(
        404, f"There is no endpoint {name!r}. The endpoints are {', '.join(endpoints(blocks))} (see the README, or /gradio_api/info)."
    )


def _input_names(fn) -> list[str]:
    """The names of an event's input values, in order (its handler's parameters)."""
    names = list(inspect.signature(fn.fn).parameters)
    return names[: len(fn.inputs)] if len(names) >= len(fn.inputs) else [f"value {i + 1}" for i in range(len(fn.inputs))]


def guard_queue(demo, max_per_client: int) -> None:
    """Gradio 6's queue has one global size limit and trusts what joins it; this checks every request
    before it joins: not while draining (503), a known endpoint (404), all its values (422), a short
    session id (422; Gradio keeps them in memory), and at most `max_per_client` requests waiting or
    running per client address (429), so one client re-joining as slots free cannot take the queue."""
    queue = demo._queue
    push = queue.push

    async def guarded_push(body, request, username):
        if _finishing(demo) is not None:
            raise HTTPException(503, RESTARTING)
        fn = demo.fns.get(body.fn_index) if body.fn_index is not None else None
        if fn is None:
            raise _unknown_endpoint(demo, f"fn_index {body.fn_index}")
        if len(body.data) < len(fn.inputs):
            names = _input_names(fn)
            raise HTTPException(
                422, f"/{fn.api_name} takes {len(names)} values ({', '.join(names)}); the request sent {len(body.data)}."
            )
        if body.session_hash is not None and not SESSION_ID.fullmatch(body.session_hash):
            raise HTTPException(422, "The session id must be 1 to 64 letters, digits, '-' or '_'.")
        client = client_address(request)
        held = sum(1 for event in list(queue.event_ids_to_events.values()) if client_address(event.request) == client)
        if client is not None and held >= max_per_client:
            raise HTTPException(
                429, f"You already have {held} requests waiting or running (the limit is {max_per_client} per client): "
                "wait for one to finish, then try again."
            )
        return await push(body=body, request=request, username=username)

    queue.push = guarded_push


class BodyLimit:
    """ASGI middleware: a request whose body is over `max_bytes` gets 413 and a sentence, before more
    than `max_bytes` of it is read (a declared length is checked at once; a streamed one as it comes)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):  # streamed: read it here, up to the limit
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await self._refuse(scope, receive, send)
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = JSONResponse(
            {"detail": f"The request is larger than {self.max_bytes:,} bytes, more than any input this app takes."}, status_code=413
        )
        await response(scope, receive, send)


def app_kwargs(max_body_bytes: int) -> dict:
    """FastAPI arguments for `launch(app_kwargs=...)`: a fresh dict each call (Gradio writes into it)."""

    async def unknown_name(request, err):
        blocks = request.app.get_blocks()
        name = request.path_params.get("api_name") or str(err)
        return JSONResponse({"detail": _unknown_endpoint(blocks, f"/{name}").detail}, status_code=404)

    return {"middleware": [Middleware(BodyLimit, max_bytes=max_body_bytes)], "exception_handlers": {FnIndexInferError: unknown_name}}


def drain(demo, seconds: float, poll_s: float = 0.1) -> bool:
    """Stop taking work and let running work finish, for at most `seconds`: requests that join from now
    on get 503 and a sentence, requests still waiting get the same sentence when their turn comes (at
    once: they never start), requests already running finish. True when nothing was left unfinished."""
    queue = demo._queue
    demo._circuitbreaker_finishing = frozenset(event._id for job in list(queue.active_jobs) if job for event in job)
    deadline = time.monotonic() + seconds
    while queue.event_ids_to_events and time.monotonic() < deadline:
        time.sleep(poll_s)
    return not queue.event_ids_to_events
