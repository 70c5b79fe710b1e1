"""A Tornado application on the shop's Django ORM, concurrent in one thread.

Run (after creating, migrating and seeding the shop database, see
examples/README.md):

    python examples/tornado_app.py --port 8888

Handlers decorated with ``@greenpatch.green`` run in their own worker
greenlet: their ordinary blocking Django code parks the worker on each
query and the IOLoop keeps serving other requests. A plain ``async def``
handler can ``await greenpatch.spawn(fn)`` instead. When a worker ends, its
Django connection goes back to greenpatch's pool (watch ``/stats``).

    GET  /                      the endpoints
    GET  /ping                  no database: answers even while /slow runs
    GET  /products[?category=]  list (green)
    GET  /products/<id>         model_to_dict() of one product (green)
    POST /products/<id>/buy     select_for_update; 409 when out of stock (green)
    GET  /slow?seconds=0.5      SELECT SLEEP(seconds), then a count (green)
    GET  /categories            async def handler awaiting greenpatch.spawn()
    GET  /stats                 greenpatch.stats() and hub.stats(): pools, workers

With ``GREENPATCH=0`` nothing is patched and Django refuses ORM calls while
the loop runs (``SynchronousOnlyOperation``, a 500). Forcing them with
``DJANGO_ALLOW_ASYNC_UNSAFE=true`` shows what greenpatch avoids: each query
blocks the loop, ten parallel ``/slow`` take ten times as long and ``/ping``
waits for all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import tornado.web

import greenpatch

greenpatch.patch_all()  # before Django is imported

sys.path.insert(0, str(Path(__file__).resolve().parent / "shop"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_project.settings")

import django  # noqa: E402

django.setup()

from catalog import services  # noqa: E402
from catalog.models import Product  # noqa: E402
from django.core.serializers.json import DjangoJSONEncoder  # noqa: E402
from django.forms.models import model_to_dict  # noqa: E402

log = logging.getLogger("tornado_app")

ENDPOINTS = [
    "GET /ping",
    "GET /products?category=<slug>",
    "GET /products/<id>",
    "POST /products/<id>/buy",
    "GET /slow?seconds=0.5",
    "GET /categories",
    "GET /stats",
]

#: Requests being handled now; shutdown waits for them (up to --grace seconds).
_in_flight: set[int] = set()


class JSONHandler(tornado.web.RequestHandler):
    def prepare(self) -> None:
        _in_flight.add(id(self))

    def on_finish(self) -> None:
        _in_flight.discard(id(self))

    def on_connection_close(self) -> None:
        _in_flight.discard(id(self))

    def write_json(self, data: object, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(data, cls=DjangoJSONEncoder))

    def write_error(self, status_code: int, **kwargs: object) -> None:
        self.write_json({"error": self._reason}, status_code)


class IndexHandler(JSONHandler):
    def get(self) -> None:
        self.write_json({"endpoints": ENDPOINTS})


class PingHandler(JSONHandler):
    def get(self) -> None:
        self.write_json({"pong": True})


class ProductListHandler(JSONHandler):
    @greenpatch.green
    def get(self) -> None:
        self.write_json({"products": services.list_products(self.get_query_argument("category", None))})


class ProductHandler(JSONHandler):
    @greenpatch.green
    def get(self, pk: str) -> None:
        try:
            product = Product.objects.get(pk=int(pk))
        except Product.DoesNotExist:
            self.write_json({"error": f"no product {pk}"}, 404)
        else:
            self.write_json(model_to_dict(product))


class BuyHandler(JSONHandler):
    @greenpatch.green
    def post(self, pk: str) -> None:
        try:
            self.write_json(services.buy(int(pk)))
        except Product.DoesNotExist:
            self.write_json({"error": f"no product {pk}"}, 404)
        except services.OutOfStock as exc:
            self.write_json({"error": str(exc)}, 409)


class SlowHandler(JSONHandler):
    @greenpatch.green
    def get(self) -> None:
        try:
            seconds = services.parse_seconds(self.get_query_argument("seconds", None))
        except ValueError as exc:
            self.write_json({"error": str(exc)}, 400)
        else:
            self.write_json(services.slow_query(seconds))


class CategoriesHandler(JSONHandler):
    async def get(self) -> None:
        # A coroutine cannot call the ORM itself (Django would refuse: it is
        # async code); it hands blocking functions to workers and awaits them.
        categories, products = await asyncio.gather(
            greenpatch.spawn(services.list_categories), greenpatch.spawn(services.count_products)
        )
        self.write_json({"categories": categories, "products": products})


class StatsHandler(JSONHandler):
    def get(self) -> None:
        self.write_json(
            {
                "pid": os.getpid(),
                "patched": greenpatch.patched(),
                "pools": greenpatch.stats(),
                "workers": greenpatch.hub.stats(),
            }
        )


def make_app() -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/", IndexHandler),
            (r"/ping", PingHandler),
            (r"/products/?", ProductListHandler),
            (r"/products/(\d+)/?", ProductHandler),
            (r"/products/(\d+)/buy/?", BuyHandler),
            (r"/slow/?", SlowHandler),
            (r"/categories/?", CategoriesHandler),
            (r"/stats/?", StatsHandler),
        ]
    )


async def serve(port: int, address: str, grace: float) -> None:
    server = make_app().listen(port, address=address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "tornado_app listening on http://%s:%d/ (pid %d, greenpatch patches: %s)",
        address or "0.0.0.0",
        port,
        os.getpid(),
        ", ".join(greenpatch.patched()) or "none",
    )
    await stop.wait()
    log.info("shutting down: no new connections, %d request(s) in flight", len(_in_flight))
    server.stop()
    deadline = loop.time() + grace
    while _in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await server.close_all_connections()
    from greenpatch.django.pooling import close_pools

    close_pools()  # idle pooled connections say goodbye to the server
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The greenpatch Tornado + Django ORM example.")
    parser.add_argument("--port", type=int, default=8888, help="TCP port (default 8888)")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds requests get to finish on exit")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(opts.port, opts.address, opts.grace))


if __name__ == "__main__":
    main()
