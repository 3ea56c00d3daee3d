"""Service side of ThrottleX: the FastAPI app, the role runner and the `throttlex` command line.

The outermost layer: it may import `ingest` and `processors`; neither imports it.
"""
