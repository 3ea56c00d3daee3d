import os

# The benchmarks build settings with the development salt, also when run as `python -m tests.perf.…`
# (`make bench` sets it too); a role outside them refuses it (ingest/settings.py).
os.environ.setdefault("THROTTLEX_ALLOW_DEV_SECRETS", "1")
