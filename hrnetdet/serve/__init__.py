"""``hrnetdet serve``: a detector as an HTTP service. ``server`` (routes, LitServe wiring) and
``model`` (the inference workers' side) need the ``serve`` extra; ``requests`` (what a request may
be), ``responses`` (the answer and its JSON Schema), ``metrics`` and ``client`` (the server's
answers as ``hrnetdet.predict`` results, and ``predict --server``'s engine) do not."""
