"""The Ray Serve application: an OpenAI-compatible HTTP ingress over a batching engine deployment.

    HTTP ──> OpenAIIngress (FastAPI: auth, validation, tokenisation, response bodies, SSE)
                 │  DeploymentHandle, bounded queue (max_ongoing_requests + max_queued_requests)
                 v
             EngineReplica (one Engine holding every variant as a named adapter; `@serve.batch`
                 collects concurrent requests of ANY variants into one `engine.generate` call)

Why two deployments: the engine's queue is the one place where load is bounded. When it is full the
handle raises `BackPressureError` and the ingress answers 503 with `Retry-After` and an OpenAI-style
body; a killed engine replica makes the requests in flight fail with a 503 of their own while Serve
starts a new replica, and the ingress keeps answering (`/health` says the engine is down meanwhile).

The engine replica reports per-request failures as values (`{"error": ...}`), so one bad request in
a batch never fails its batch-mates, and no exception type has to survive Ray's serialisation.

Import path for `serve run` / `serve deploy`: `ga_ray.serve.app:build_app` with args
`{run_dir: ..., config: ..., set: [...]}` (see cluster/serve-config.yaml).
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures (Request) at runtime

import asyncio
import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ga_ray.config import RunConfig, load_config
from ga_ray.engine.protocol import FINETUNED, EngineError, GenerationRequest, SamplingParams, UnknownVariantError
from ga_ray.errors import GaRayError
from ga_ray.serve import schema, sse
from ga_ray.serve.catalog import ConflictError, VariantCatalog
from ga_ray.serve.errors import ApiError, bad_request, overloaded, unknown_model

log = logging.getLogger("ga_ray.serve")

APP_NAME = "ga-ray"


def run_adapter(cfg: RunConfig, run_dir: str | Path) -> Path | None:
    """The run's fine-tuned adapter (model id `finetuned`): `RUN_DIR/adapter` when the run fine-tunes,
    else `model.adapter`; None when neither exists."""
    if cfg.finetune.enabled:
        p = Path(run_dir) / "adapter"
        return p if (p / "adapter_config.json").exists() else None
    return Path(cfg.model.adapter) if cfg.model.adapter else None


def build_engine(cfg: RunConfig, adapter: Path | None, variants: dict[str, Path]) -> Any:
    """The engine of one replica (`serve.engine`: peft / vllm / auto), every variant loaded once.
    vLLM is imported only on its path (inside `make_engine`)."""
    from ga_ray.engine import make_engine, resolve_engine_kind

    kind = resolve_engine_kind(cfg.serve.engine)
    if kind == "vllm":
        return make_engine(kind, cfg.model, adapter=adapter, variants=variants)
    threads = max(1, int(cfg.serve.cpus_per_worker))  # the one resource policy: torch threads = CPUs rounded down
    return make_engine(kind, cfg.model, adapter=adapter, variants=variants, max_batch_size=cfg.serve.max_batch_size,
                       torch_threads=threads)


def _err(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, "param": param, "code": code}}


# ------------------------------------------------------------------------------------ engine replica


@serve.deployment(name="EngineReplica")
class EngineReplica:
    """One engine with every variant of the run; concurrent requests are batched across variants."""

    def __init__(self, run_dir: str, config: dict[str, Any]) -> None:
        self.cfg = RunConfig.model_validate(config)
        adapter = run_adapter(self.cfg, run_dir)
        self.catalog = VariantCatalog(run_dir, adapter, self.cfg.serve.refresh_interval_s)
        initial = {i: e.path for i in self.catalog.ids() if (e := self.catalog.get(i)) is not None and e.kind not in ("base", "finetuned")}
        self.engine = build_engine(self.cfg, adapter, initial)
        self.kind = type(self.engine).__name__
        self._generate_batch.set_max_batch_size(self.cfg.serve.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)
        self._score_batch.set_max_batch_size(self.cfg.serve.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # sizes of the last batches (observability, tests)

    def info(self) -> dict[str, Any]:
        return {"max_context": int(self.engine.max_context), "variants": self.engine.variants(), "kind": self.kind,
                "pid": os.getpid(), "batch_sizes": self.batch_sizes[-256:]}

    def _ensure(self, variant: str) -> dict[str, Any] | None:
        """Load `variant` if the catalog knows it and the engine does not yet; an error value otherwise."""
        if variant in self.engine.variants():
            return None
        try:
            entry = self.catalog.get(variant)
        except ConflictError as exc:
            return _err(409, str(exc), "model", "variant_conflict")
        if entry is None or entry.path is None:
            return _err(404, f"The model {variant!r} does not exist on this server", "model", "model_not_found")
        try:
            self.engine.add_variant(entry.id, entry.path)
        except GaRayError as exc:
            return _err(409 if "re-bound" in str(exc) else 500, f"variant {variant!r} cannot be loaded: {exc}", "model")
        return None

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        """item: {variant, prompt_ids, sampling: SamplingParams fields}; returns a Generation's fields or an error."""
        return await self._generate_batch(item)

    async def score(self, item: dict[str, Any]) -> dict[str, Any]:
        """item: {variant, prompt_ids, top_logprobs}; returns a Scored's fields or an error."""
        return await self._score_batch(item)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.batch_sizes.append(len(items))
        return await asyncio.to_thread(self._generate_sync, items)

    def _generate_sync(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(items)
        todo: list[tuple[int, GenerationRequest]] = []
        for i, it in enumerate(items):
            err = self._ensure(it["variant"])
            if err is not None:
                out[i] = err
                continue
            try:
                todo.append((i, GenerationRequest(it["variant"], it["prompt_ids"], SamplingParams(**it["sampling"]))))
            except EngineError as exc:
                out[i] = _err(400, str(exc))
        if todo:
            for i, res in zip([i for i, _ in todo], self._run_generate([r for _, r in todo])):
                out[i] = res
        return out  # type: ignore[return-value]

    def _run_generate(self, reqs: list[GenerationRequest]) -> list[dict[str, Any]]:
        try:
            return [vars(g).copy() for g in self.engine.generate(reqs)]
        except (EngineError, UnknownVariantError) as exc:
            if len(reqs) == 1:
                return [_err(404 if isinstance(exc, UnknownVariantError) else 400, str(exc))]
            # one bad request must not fail its batch-mates: find it by running them one at a time
            return [self._run_generate([r])[0] for r in reqs]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _score_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._score_sync, items)

    def _score_sync(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(items)
        by_variant: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            err = self._ensure(it["variant"])
            if err is not None:
                out[i] = err
            else:
                by_variant.setdefault(it["variant"], []).append(i)
        for variant, idx in by_variant.items():
            k = max(int(items[i]["top_logprobs"]) for i in idx)
            try:
                scored = self.engine.score([items[i]["prompt_ids"] for i in idx], variant, top_logprobs=k)
            except EngineError as exc:
                for i in idx:
                    out[i] = _err(400, str(exc))
                continue
            for i, s in zip(idx, scored):
                ki = int(items[i]["top_logprobs"])
                top = None if s.top_logprobs is None or ki == 0 else [None if t is None else t[:ki] for t in s.top_logprobs]
                out[i] = {"token_ids": s.token_ids, "logprobs": s.logprobs, "top_logprobs": top}
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ HTTP ingress

api = FastAPI(title="ga-ray", docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown route, wrong method
    msg = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404:
        msg += " (this server offers GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health)"
    return _error_response(ApiError(exc.status_code, msg, code="route_not_found" if exc.status_code == 404 else None))


def _retryable(exc: BaseException) -> bool:
    """A failure of the engine replica itself (died, restarting, unreachable): the client may retry."""
    import ray.exceptions as rex
    from ray.serve.exceptions import DeploymentUnavailableError

    kinds = tuple(k for k in (getattr(rex, n, None) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                                   "ActorUnschedulableError", "WorkerCrashedError", "NodeDiedError"))
                  if k is not None)
    return isinstance(exc, kinds + (DeploymentUnavailableError,))


@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """Auth, validation, tokenisation and OpenAI bodies; the engine deployment does the model work."""

    def __init__(self, engine: Any, run_dir: str, config: dict[str, Any], api_key_sha256: str | None = None) -> None:
        from ga_ray.kernel.loading import load_tokenizer

        self.engine = engine
        self.cfg = RunConfig.model_validate(config)
        s = self.cfg.serve
        self.limits = schema.Limits(max_tokens=s.max_tokens_limit, max_top_logprobs=s.max_top_logprobs, max_prompts=s.max_prompts_per_request)
        self.retry_after = s.retry_after_s
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.catalog = VariantCatalog(run_dir, run_adapter(self.cfg, run_dir), s.refresh_interval_s)
        self.key_sha256 = api_key_sha256
        self._max_context: int | None = None
        self._token_cache: dict[int, str] = {}

    # ---------------------------------------------------------------------------- plumbing

    def _auth(self, request: Request) -> None:
        if self.key_sha256 is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
        if scheme.lower() != "bearer" or not token or not hmac.compare_digest(digest, self.key_sha256):
            raise ApiError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _call(self, method: str, item: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        try:
            res = await getattr(self.engine, method).remote(item)
        except BackPressureError:
            raise overloaded(self.retry_after) from None
        except Exception as exc:
            if _retryable(exc):
                raise overloaded(self.retry_after, "the engine replica failed while handling this request "
                                                   f"({type(exc).__name__}); Serve is restarting it") from None
            log.exception("engine call failed")
            raise ApiError(500, f"internal error in the engine ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})",
                           code="engine_error") from None
        if "error" in res:
            e = res["error"]
            raise ApiError(e["status"], e["message"], param=e.get("param"), code=e.get("code"))
        return res

    async def _context(self) -> int:
        if self._max_context is None:
            from ray.serve.exceptions import BackPressureError

            try:
                info = await self.engine.info.remote()
            except BackPressureError:
                raise overloaded(self.retry_after) from None
            except Exception as exc:
                if _retryable(exc):
                    raise overloaded(self.retry_after, "the engine replica is restarting") from None
                raise
            self._max_context = int(info["max_context"])
        return self._max_context

    def _model(self, model_id: str) -> str:
        try:
            entry = self.catalog.get(model_id)
        except ConflictError as exc:
            raise ApiError(409, str(exc), param="model", code="variant_conflict") from None
        if entry is None:
            raise unknown_model(model_id, self.catalog.ids())
        return entry.id

    def _tok(self, t: int) -> str:
        s = self._token_cache.get(t)
        if s is None:
            s = self._token_cache[t] = self.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return s

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _encode_prompt(self, prompt: str | list[int], field: str) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        bound = len(self.tokenizer)
        bad = [t for t in prompt if t < 0 or t >= bound]
        if bad:
            raise bad_request(f"Invalid value for '{field}': token ids must be in [0, {bound}) (got {bad[:3]})", param=field)
        return list(prompt)

    @staticmethod
    def _sampling(dec: schema.Decoding, max_tokens: int) -> dict[str, Any]:
        return {"max_new_tokens": max_tokens, "temperature": dec.temperature, "top_p": dec.top_p, "seed": dec.seed,
                "stop": list(dec.stop), "logprobs": dec.logprobs}

    async def _guarded(self, request: Request, fn: Any) -> Response:
        try:
            self._auth(request)
            return await fn()
        except ApiError as exc:
            return _error_response(exc)

    # ---------------------------------------------------------------------------- routes

    @api.get("/health")
    async def health(self) -> Response:
        try:
            info = await asyncio.wait_for(self.engine.info.remote(), timeout=10)
        except Exception as exc:  # timeout, replica down, back-pressure: not healthy now
            return _error_response(overloaded(self.retry_after, f"the engine is not ready ({type(exc).__name__})"))
        return JSONResponse({"status": "ok", "engine": info["kind"], "models": len(self.catalog.ids())})

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def run() -> Response:
            self.catalog.refresh()
            return JSONResponse(schema.models_body(self.catalog.ids(), schema.now()))
        return await self._guarded(request, run)

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> Response:
        async def run() -> Response:
            mid = self._model(model_id)
            return JSONResponse({"id": mid, "object": "model", "created": schema.now(), "owned_by": "ga-ray"})
        return await self._guarded(request, run)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._guarded(request, lambda: self._completions(request))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._guarded(request, lambda: self._chat(request))

    # ---------------------------------------------------------------------------- completions

    async def _completions(self, request: Request) -> Response:
        req = schema.parse_body(await request.body(), schema.CompletionRequest)
        dec = schema.completion_decoding(req, self.limits)
        variant = self._model(req.model)
        ctx = await self._context()
        prompts = req.prompts()
        field = "prompt"
        ids = [self._encode_prompt(p, field) for p in prompts]
        budgets = [schema.resolve_max_tokens(dec, len(x), ctx, self.limits, field) for x in ids]
        k = dec.logprobs
        calls = []
        for x, n in zip(ids, budgets):
            gen = self._call("generate", {"variant": variant, "prompt_ids": x, "sampling": self._sampling(dec, n)}) if n > 0 else None
            sc = self._call("score", {"variant": variant, "prompt_ids": x, "top_logprobs": k or 0}) if (dec.echo and k is not None) else None
            calls.append((gen, sc))
        flat = [c for pair in calls for c in pair if c is not None]
        results = iter(await asyncio.gather(*flat))
        rid, created = schema.new_id("cmpl"), schema.now()
        choices, stream_choices = [], []
        n_prompt = n_gen = 0
        for index, ((gen_c, sc_c), p, x) in enumerate(zip(calls, prompts, ids)):
            gen = next(results) if gen_c is not None else None
            sc = next(results) if sc_c is not None else None
            prefix = (p if isinstance(p, str) else self._decode(x)) if dec.echo else ""
            text = gen["text"] if gen else ""
            finish = gen["finish_reason"] if gen else "length"
            n_prompt += len(x)
            n_gen += len(gen["token_ids"]) if gen else 0
            lp_obj = None
            if k is not None:
                toks, lps, tops = [], [], []
                if sc is not None:
                    toks += [self._tok(t) for t in sc["token_ids"]]
                    lps += sc["logprobs"]
                    tops += [None if (sc["top_logprobs"] is None or t is None) else {self._tok(a): b for a, b in t}
                             for t in (sc["top_logprobs"] or [None] * len(sc["token_ids"]))]
                if gen is not None:
                    toks += [self._tok(t) for t in gen["token_ids"]]
                    lps += gen["logprobs"] or []
                    tops += [{self._tok(a): b for a, b in t} for t in (gen["top_logprobs"] or [])]
                lp_obj = schema.completion_logprobs(toks, lps, tops if k > 0 else None)
            choices.append({"index": index, "text": prefix + text, "logprobs": lp_obj, "finish_reason": finish})
            if dec.stream:
                pieces = sse.text_pieces(gen["token_ids"], text, self._decode) if gen else []
                stream_choices.append({"prefix": prefix, "pieces": pieces, "finish_reason": finish})
        use = schema.usage(n_prompt, n_gen)
        if dec.stream:
            return StreamingResponse(sse.completion_chunks(rid, created, req.model, stream_choices, use if dec.include_usage else None),
                                     media_type="text/event-stream")
        return JSONResponse(schema.completion_body(rid, created, req.model, choices, use))

    # ---------------------------------------------------------------------------- chat

    async def _chat(self, request: Request) -> Response:
        from ga_ray.engine.protocol import chat_prompt_ids

        req = schema.parse_body(await request.body(), schema.ChatCompletionRequest)
        dec = schema.chat_decoding(req, self.limits)
        variant = self._model(req.model)
        ctx = await self._context()
        try:
            ids = chat_prompt_ids(self.tokenizer, req.chat())
        except Exception as exc:  # the chat template refused the messages (jinja2 TemplateError, ...)
            raise bad_request(f"Invalid value for 'messages': the model's chat template cannot render them ({exc})",
                              param="messages") from None
        budget = schema.resolve_max_tokens(dec, len(ids), ctx, self.limits, "messages")
        gen = await self._call("generate", {"variant": variant, "prompt_ids": ids, "sampling": self._sampling(dec, budget)})
        rid, created = schema.new_id("chatcmpl"), schema.now()
        use = schema.usage(len(ids), len(gen["token_ids"]))
        if dec.stream:
            pieces = sse.text_pieces(gen["token_ids"], gen["text"], self._decode)
            return StreamingResponse(sse.chat_chunks(rid, created, req.model, pieces, gen["finish_reason"], use if dec.include_usage else None),
                                     media_type="text/event-stream")
        lp_obj = None
        if dec.logprobs is not None:
            tops = None
            if dec.logprobs > 0:
                tops = [[(self._tok(a), b) for a, b in t] for t in gen["top_logprobs"]]
            lp_obj = schema.chat_logprobs([self._tok(t) for t in gen["token_ids"]], gen["logprobs"], tops)
        choice = {"index": 0, "message": {"role": "assistant", "content": gen["text"], "refusal": None},
                  "logprobs": lp_obj, "finish_reason": gen["finish_reason"]}
        return JSONResponse(schema.chat_body(rid, created, req.model, [choice], use))


# ------------------------------------------------------------------------------------ application


def application(run_dir: str | Path, cfg: RunConfig, api_key: str | None = None) -> Any:
    """The bound Serve application for `run_dir` with `cfg` (deployment options from `cfg.serve`)."""
    from ga_ray.resources import ray_cluster_gpus, resolve_gpus

    s = cfg.serve
    run_dir = str(Path(run_dir).resolve())
    data = cfg.model_dump(mode="json")
    ongoing = max(s.max_ongoing_requests, s.max_batch_size)
    gpus = resolve_gpus(s.gpus_per_worker, ray_cluster_gpus())  # `serve deploy` builds the app inside the cluster
    engine = EngineReplica.options(
        num_replicas=s.num_workers,
        max_ongoing_requests=ongoing,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.cpus_per_worker, "num_gpus": gpus},
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
    ).bind(run_dir, data)
    # the ingress must never be the bottleneck: it admits more than the engine can queue, so overload
    # is decided (and answered with an OpenAI body) at the engine's bounded queue
    admit = s.num_workers * (ongoing + s.max_queued_requests) + 32
    key_hash = hashlib.sha256(api_key.encode("utf-8")).hexdigest() if api_key else None
    return OpenAIIngress.options(
        max_ongoing_requests=admit, max_queued_requests=admit, ray_actor_options={"num_cpus": 0.1},
        graceful_shutdown_timeout_s=5.0,
    ).bind(engine, run_dir, data, key_hash)


def build_app(args: dict[str, Any]) -> Any:
    """Entry for `serve run ga_ray.serve.app:build_app run_dir=...` and Serve config files.

    args: `run_dir` (required), `config` (YAML path or packaged name; default RUN_DIR/config.yaml),
    `set` (list of `section.key=value` overrides), `api_key_env` (default: serve.api_key_env).
    """
    if "run_dir" not in args:
        raise GaRayError("build_app needs the argument run_dir (the ga-ray run directory whose variants to serve)")
    run_dir = Path(args["run_dir"])
    config = args.get("config") or (str(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None)
    sets = args.get("set") or []
    cfg = load_config(config, list(sets) if isinstance(sets, (list, tuple)) else [str(sets)])
    env = args.get("api_key_env", cfg.serve.api_key_env)
    return application(run_dir, cfg, api_key=os.environ.get(env) if env else None)
