"""The HTTP server (``vlkit serve``): FastAPI endpoints for every task, dynamic micro-batching, limits and
a small web page. FastAPI, uvicorn and python-multipart come with the ``serve`` extra and are imported only
here, so the rest of vlkit works without them."""
