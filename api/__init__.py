"""Service side of ThrottleX (`throttlex.api`): the FastAPI app, the role runner and the `throttlex`
command line.

The outermost layer: it may import `throttlex.ingest` and `throttlex.processors`; neither imports it.
"""

if __name__ != "throttlex.api":  # imported from a checkout's top level: a second copy of every module and metric
    raise ImportError(f"import ThrottleX as throttlex.api, not {__name__} (install the checkout: pip install -e .)")
