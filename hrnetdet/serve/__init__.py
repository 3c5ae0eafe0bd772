"""``hrnetdet serve``: a detector as an HTTP service (``server``), its request checks (``requests``),
its response records (``responses``), its Prometheus counters (``metrics``), and the client that
turns answers back into ``hrnetdet.predict`` results (``client``; no server packages needed)."""
