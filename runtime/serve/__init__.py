"""`fastslm-serve`: an OpenAI-compatible HTTP server over one Pipeline, and its Ray scale-out.

    options.py    ServeOptions: where to listen and every bound (bytes, seconds, queue, tokens)
    uploads.py    uploaded bytes -> 16 kHz samples, refusing what is too big, too long or not audio
    engine.py     the worker threads, the bounded queue, the shared session (audio-prefix) cache
    api_errors.py OpenAI's error shape
    requests.py   the two POST bodies checked field by field
    app.py        the FastAPI routes (/v1/audio/transcriptions, /v1/chat/completions, ...)
    cli.py        the `fastslm-serve` command
    local.py      a server on 127.0.0.1 inside this process (load test, tests)
    loadtest.py   `fastslm-serve-bench`: requests/s and latency percentiles at several client counts
    ray_app.py    the same app as a Ray Serve deployment with replicas and autoscaling
    ray_batch.py  Ray Data batch inference over a folder, one JSON per recording, resumable

Nothing here imports torch; FastAPI and uvicorn come with `pip install 'fastslm[serve]'`.
"""
