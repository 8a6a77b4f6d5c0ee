"""`ga-ray serve RUN_DIR`: the run's variants as OpenAI-compatible endpoints on Ray Serve.

Layers: `schema` (request validation and response bodies, pure), `errors` (OpenAI-style error
bodies), `sse` (server-sent events), `catalog` (which model ids exist: folders inside the run's
`variants/` only), `app` (the two Ray Serve deployments: an HTTP ingress and a batching engine
replica), `launch` (start it on a local Ray, the CLI's entry). Not a pipeline stage.
"""
