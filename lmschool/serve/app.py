"""The HTTP side of `lmschool serve`: OpenAI's API shapes over the engine, and the web page.

    GET  /v1/models                   the served models (ids: run names)
    POST /v1/chat/completions         messages -> answer; stream (server-sent events) or not
    POST /v1/completions              plain-text continuation (a pre-trained model's use)
    GET  /health                      liveness and the engine's counters (no key needed)
    GET  /                            the page: chat, compare, report (static/, no build step)
    GET  /api/info, POST /api/score, GET /api/report, GET /report/plots/NAME   what the page reads

Request fields follow OpenAI's (`temperature`, `top_p`, `max_tokens` / `max_completion_tokens`,
`stop`, `seed`, `n`, `stream`, `stream_options.include_usage`, completions' `echo`), plus two
that vLLM also takes: `top_k` and `ignore_eos` (decode exactly `max_tokens` tokens; benchmarks).
Types are checked strictly, as OpenAI does ("0.5" is not a number). Fields OpenAI has and
lmschool does not implement (logprobs, penalties, tools, ...) are refused by name when set to
anything but their neutral value; unknown fields are ignored.

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 bad JSON, a
wrong type or value, a prompt longer than the context (code `context_length_exceeded`); 401
without the key when `--api-key` is set; 404 unknown model (`model_not_found`); 413 a body over
`MAX_BODY_BYTES`; 429 with `Retry-After` when the queue is full; 500 when the model fails.

Seeds: sample i of a request with `seed` s draws from a generator seeded s + i, as
`lmschool generate --seed s+i` does, so a request alone on the server returns exactly what
`lmschool generate` prints (a request that shares its steps with others may differ by float
rounding of the batched matrix products, rarely a token). Without a seed each sample gets a
fresh one.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lmschool.errors import UserError
from lmschool.generate import RowSampling
from lmschool.serve.engine import Engine, Job, QueueFull, seeded

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 8 << 20          # 8 MiB: far more than any context here holds
RETRY_AFTER_S = 1
INT64 = 2**63

# ---- request bodies (strict types: OpenAI refuses "0.5" for a number) ------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None

    # fields OpenAI has that are not implemented: refused unless neutral
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    best_of: Any = None
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ScoreRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    responses: list[str] = Field(min_length=1, max_length=64)


NEUTRAL = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
           "frequency_penalty": (None, 0), "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""),
           "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
           "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- the app -------------------------------------------------------------------------------------


def create_app(models: dict, engine: Engine, *, api_key: str | None = None, report_run: Path | None = None,
               teachers=None) -> FastAPI:
    """The FastAPI app over loaded models (id -> ServedModel) and a running engine."""
    app = FastAPI(title="lmschool serve", docs_url="/docs", redoc_url=None)
    app.state.models, app.state.engine = models, engine

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _validation_error(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)).response()

    app.add_middleware(BodyLimit)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key. Provide it in an Authorization header "
                                "(Authorization: Bearer YOUR_KEY); the server was started with --api-key.",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    guarded = [Depends(authorized)]

    # ---- OpenAI's API -------------------------------------------------------------------------------

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        return {"object": "list", "data": [_model_card(m) for m in models.values()]}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def get_model(model_id: str):
        return _model_card(_model(models, model_id))

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        served = _model(models, body.model)
        _refuse_unsupported(body)
        if not served.tokenizer.has_chat_tokens:
            raise APIError(400, f"model {served.id!r} has no chat template (its tokenizer lacks the chat "
                                "tokens); use /v1/completions for plain text", param="model")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            prompt, _ = served.tokenizer.render(messages, add_generation_prompt=True)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = _job(served, [prompt], body, max_tokens, "messages", served.tokenizer.stop_ids)
        return await Reply("chat.completion", served.id, job, body).answer(engine, request)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        served = _model(models, body.model)
        _refuse_unsupported(body)
        tokenizer = served.tokenizer
        raw = body.prompt
        if isinstance(raw, str):
            raw = [raw]
        elif raw and all(isinstance(t, int) for t in raw):
            raw = [raw]
        if not raw:
            raise APIError(400, "prompt is an empty list; give a string, strings, or token ids", param="prompt")
        prompts = []
        for p in raw:
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:   # an empty prompt starts a document, as after <|endoftext|>
                if tokenizer.eos_id is None:
                    raise APIError(400, "the prompt is empty and this tokenizer has no end-of-text token to "
                                        "start from; give some text", param="prompt")
                ids = [tokenizer.eos_id]
            bad = next((t for t in ids if not 0 <= t < served.model.config.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary (0..{served.model.config.vocab_size - 1})",
                               param="prompt")
            prompts.append(ids)
        stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        job = _job(served, prompts, body, body.max_tokens or 16, "prompt", stop_ids)
        echo = [tokenizer.decode(p, skip_special=True) for p in prompts] if body.echo else None
        return await Reply("text_completion", served.id, job, body, echo).answer(engine, request)

    # ---- health and the page ------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), "auth": api_key is not None, **engine.stats()}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/report", include_in_schema=False)
    async def report_page():
        if report_run is None:
            raise APIError(404, "no report: the server was not started on a pipeline run (lmschool serve runs/demo)")
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info", dependencies=guarded)
    async def info():
        return {"models": [m.info() for m in models.values()], "report": _report_file(report_run) is not None,
                "run": str(report_run) if report_run else None, "max_batch": engine.max_batch}

    @app.post("/api/score", dependencies=guarded)
    async def score(body: ScoreRequest):
        served = _model(models, body.model)
        if served.world is None or teachers is None:
            raise APIError(404, f"no school world is known for {served.id!r}, so there is no teacher to score "
                                "with; start the server with --world DIR", code="no_world")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        return {"world": str(served.world), "scores": teachers.score(served.world, messages, body.responses)}

    @app.get("/api/report", dependencies=guarded)
    async def report():
        path = _report_file(report_run)
        if path is None:
            raise APIError(404, "no report: serve a pipeline run that has one (lmschool serve runs/demo)")
        return {"run": str(report_run), "markdown": path.read_text(encoding="utf-8")}

    @app.get("/report/plots/{name}", dependencies=guarded, include_in_schema=False)
    async def plot(name: str):
        plots = (report_run / "plots") if report_run else None
        path = plots / name if plots else None
        if path is None or "/" in name or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no plot {name!r}")
        return FileResponse(path)

    return app


def _report_file(run: Path | None) -> Path | None:
    return run / "report.md" if run is not None and (run / "report.md").is_file() else None


def _model_card(served) -> dict:
    return {"id": served.id, "object": "model", "created": served.created, "owned_by": "lmschool",
            "context_length": served.context}


def _model(models: dict, model_id: str):
    if model_id not in models:
        raise APIError(404, f"The model '{model_id}' does not exist; this server has: {', '.join(models)}",
                       param="model", code="model_not_found")
    return models[model_id]


def _refuse_unsupported(body: Sampling) -> None:
    for name, neutral in NEUTRAL.items():
        value = getattr(body, name)
        if not any(value == v and type(value) is type(v) for v in neutral):
            raise APIError(400, f"'{name}' is not supported by lmschool serve; leave it out", param=name,
                           code="unsupported_parameter")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|[A-Z]\w*|.*\[.*)$")


def _validation_error(errors: list[dict]) -> APIError:
    first = errors[0]
    # pydantic names a union's member in the path ("prompt.list[int]", "content.str"): not a field
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_TAG.match(str(x))]
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON "
                             f"({first.get('ctx', {}).get('error', 'malformed')}). Send a JSON object.",
                        code="invalid_json")
    param = ".".join(loc) or None
    where = f"'{param}'" if param else "the body"
    message = f"Invalid value for {where}: {first.get('msg', 'invalid')}"
    if first.get("type") == "missing":
        message = f"Missing required parameter: {where}"
    return APIError(400, message, param=param, code="invalid_value" if first.get("type") != "missing" else "missing_required_parameter")


def _job(served, prompts: list[list[int]], body: Sampling, max_tokens: int | None, what: str,
         stop_ids: list[int]) -> Job:
    """Check lengths against the context and build the engine's job (one row per prompt and sample)."""
    context = served.context
    for ids in prompts:
        room = context - len(ids)
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your {what} "
                                f"resulted in {len(ids)} tokens. Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the {what}, {max_tokens} in the "
                                f"completion). Please reduce the length of the {what} or completion.",
                           param="max_tokens", code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop")
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    samplings = []
    for ids in prompts:
        rows = []
        for i in range(body.n):
            seed = seeded(None if body.seed is None else body.seed + i)
            rows.append(RowSampling(max_tokens or context - len(ids), temperature, body.top_k or 0, top_p, seed,
                                    () if body.ignore_eos else tuple(stop_ids)))
        samplings.append(rows)
    return Job(served.id, prompts, samplings, stops, emit=lambda events: None)


class Reply:
    """One request's answer, whole or as chunks, in the shape of its endpoint (`object`)."""

    def __init__(self, object: str, model: str, job: Job, body: Sampling, echo: list[str] | None = None):
        self.object, self.model, self.job, self.body, self.echo = object, model, job, body, echo
        self.id = ("chatcmpl-" if object == "chat.completion" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    async def answer(self, engine: Engine, request: Request):
        """Submit the job (a full queue is a 429 before any byte is sent), then answer it whole
        or as a stream of server-sent events."""
        events = self._events(engine)
        if self.body.stream:
            return StreamingResponse(self.chunks(engine, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.whole(engine, events, request)

    def _events(self, engine: Engine):
        """Submit the job; an async iterator of its event lists (raises APIError on failure)."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.job.emit = lambda events: loop.call_soon_threadsafe(queue.put_nowait, events)
        try:
            engine.submit(self.job)
        except QueueFull:
            raise APIError(429, f"The server is busy: {engine.max_batch} samples are being written and "
                                f"{engine.max_queue} requests wait. Retry after {RETRY_AFTER_S} s.",
                           type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ValueError as e:
            raise APIError(400, str(e), param="n") from None

        async def events():
            remaining = self.job.rows
            while remaining:
                batch = await queue.get()
                for index, text, finish in batch:
                    if finish == "error":
                        raise APIError(500, text, type="server_error")
                    remaining -= finish is not None
                yield batch
        return events()

    def usage(self) -> dict:
        prompt, completion = self.job.prompt_tokens, self.job.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self, engine: Engine, events, request: Request) -> dict:
        async def drain():
            async for _ in events:
                pass

        drained = asyncio.ensure_future(drain())
        left = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({drained, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not drained.done():   # the client left (or this handler was cancelled): free the slots
                drained.cancel()
                engine.cancel(self.job)
        if drained not in done:
            raise APIError(499, "the client closed the request")
        drained.result()   # raises the job's APIError, if it failed
        choices = []
        for i, c in enumerate(self.job.choices):
            text = (self.echo[c.prompt] if self.echo else "") + c.text
            if self.object == "chat.completion":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": c.finish, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": c.finish, "logprobs": None})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(), "system_fingerprint": None}

    async def chunks(self, engine: Engine, events):
        """Server-sent events: `data: {chunk}` per step, then `data: [DONE]`. Errors after the
        response began are sent as `data: {"error": ...}`. A client that leaves cancels the job."""
        chat = self.object == "chat.completion"
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)

        def chunk(choices: list[dict], usage=None) -> str:
            body = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                    "choices": choices, "system_fingerprint": None}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(index: int, text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(self.job.rows)])
            elif self.echo:
                yield chunk([choice(i, self.echo[c.prompt], None) for i, c in enumerate(self.job.choices)])
            async for batch in events:
                texts = [choice(i, text, None) for i, text, _ in batch if text]
                ends = [choice(i, None if chat else "", finish) for i, _, finish in batch if finish]
                for part in (texts, ends):
                    if part:
                        yield chunk(part)
            if include_usage:
                yield chunk([], self.usage())
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps({'error': json.loads(e.response().body)['error']})}\n\n"
        finally:
            engine.cancel(self.job)   # a no-op for a job that finished


class BodyLimit:
    """413 for a body whose Content-Length is over MAX_BODY_BYTES, before it is read (plain ASGI,
    so streaming responses and disconnects pass through untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                response = APIError(413, f"the request body is {int(length)} bytes; at most {MAX_BODY_BYTES} "
                                         "are read", code="request_too_large").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
