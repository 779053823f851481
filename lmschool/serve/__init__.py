"""`lmschool serve`: an OpenAI-compatible server with batched decoding, and a web page.

- engine.py: the scheduler (one thread; each model's requests decoded as one batch, bounded queue)
- models.py: what a CKPT argument serves (ids, a pipeline run's stages and report, the world)
- app.py: FastAPI routes in OpenAI's shapes, errors included, and the page's few endpoints
- static/: the page (plain HTML, CSS and JavaScript; no build step, nothing fetched from elsewhere)

Needs the `serve` extra (fastapi, uvicorn): `pip install 'lmschool[serve]'`.
"""
