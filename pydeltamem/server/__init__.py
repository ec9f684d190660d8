"""`deltamem serve`: an OpenAI-compatible HTTP server whose sessions keep their δ-mem memory.

engine (the model, the batched generation loop, admission, counters), sessions (continuing a
session from a request's messages, live sessions and their eviction), store (the SQLite file),
api (OpenAI's request fields and error shape), app (the Starlette routes), cli (the command).
The web stack comes with `pip install 'pydeltamem[server]'`; the engine does not need it.
"""
