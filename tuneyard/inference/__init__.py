"""Inference on trained models, in a process of its own (never the API's: the API imports no torch).

``server.py`` is that process (``tuneyard infer``, or started by the API server on first need), ``cache.py`` the
models it keeps loaded, ``generate.py`` one request's generation, ``client.py`` the API side (no torch),
``export.py`` the merged export.
"""
