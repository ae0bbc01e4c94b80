"""`llmswarm api`: an OpenAI-compatible HTTP endpoint onto the swarm, and a live page of the swarm.

`protocol.py` (the OpenAI shapes, sans-IO), `sessions.py` (one swarm session per request), `app.py`
(the Starlette routes and the streamed responses), `serve.py` (hypercorn's trio worker, the host and
the directory), `page.html` (the page: one file with its own script and style).
"""
