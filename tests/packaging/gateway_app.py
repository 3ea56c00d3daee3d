"""A small Starlette API behind the ThrottleX middleware, as a team would write it with only the gateway
install (`pip install throttlex`): run by `test_install.py` from a fresh virtual environment."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.middleware import ThrottleXMiddleware
from throttlex.ingest.producer import EventProducer

producer = EventProducer(os.environ["GATEWAY_KAFKA"], os.environ["GATEWAY_TOPIC"])
denylist = EdgeDenylist(os.environ["GATEWAY_REDIS_URL"], os.environ["GATEWAY_REDIS_PREFIX"])


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["item_id"]})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await producer.start()
    await denylist.start()
    try:
        yield
    finally:
        await denylist.stop()
        await producer.stop()


app = Starlette(routes=[Route("/items/{item_id}", item)], lifespan=lifespan)
app.add_middleware(ThrottleXMiddleware, denylist=denylist, producer=producer, key_salt=os.environ["GATEWAY_SALT"].encode(),
                   tenant="packaging-test")
