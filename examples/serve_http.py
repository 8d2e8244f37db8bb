"""An accelerated SmolLM2 behind HTTP, streaming its tokens as they are generated (FastAPI).

    pip install "hetero_llm[serve]"        # fastapi and uvicorn
    python examples/serve_http.py [--port 8000]
    curl -N localhost:8000/generate -d '{"prompt": "Write a haiku about the sea.", "max_new_tokens": 48}'

POST /generate takes {"prompt": str, "max_new_tokens": int (default 64), "stream": bool (default
true), "chat": bool (default true: wrap the prompt in the model's chat template)}. Streaming
answers are text/event-stream: one `data: {"text": "..."}` event per decoded piece, then
`data: [DONE]`. With "stream": false the answer is {"text": ...}. GET /health says which plan runs.

Greedy decoding, so the streamed text is exactly what model.generate() returns for the prompt.
Each request generates on its own thread (FastAPI runs synchronous endpoints in a thread pool,
and the streamer hands tokens from the generating thread to the response): one accelerated
model serves concurrent requests, each with its own KV cache.
"""
# No `from __future__ import annotations`: FastAPI reads the request model from the endpoint's
# annotation, which must stay a class (the model is defined inside build_app) and not a string.
import argparse
import json
import threading

import torch

from hetero_llm.serving.text import context_problem, greedy_kwargs, prompt_ids


def build_app(model, tokenizer):
    """A FastAPI app serving `model` (already accelerated) with `tokenizer`."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, Field
    from transformers import TextIteratorStreamer

    class Request(BaseModel):
        prompt: str = Field(min_length=1)
        max_new_tokens: int = Field(default=64, ge=1, le=2048)
        stream: bool = True
        chat: bool = True

    app = FastAPI(title="hetero_llm text generation")

    @app.get("/health")
    def health():
        plan = getattr(model, "hetero_plan", None)
        return {"ok": True, "model": model.config.model_type,
                "plan": None if plan is None else dict(plan.model_settings, device=plan.device)}

    @app.post("/generate")
    def generate(req: Request):
        ids = prompt_ids(tokenizer, req.prompt, req.chat)
        problem = context_problem(model, ids.shape[1], req.max_new_tokens)
        if problem is not None:
            raise HTTPException(422, problem)
        kwargs = greedy_kwargs(ids, req.max_new_tokens)
        if not req.stream:
            with torch.inference_mode():
                out = model.generate(**kwargs)
            return {"text": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)

        def run():
            with torch.inference_mode():
                model.generate(**kwargs, streamer=streamer)

        threading.Thread(target=run, daemon=True).start()

        def events():
            for piece in streamer:  # blocks until the generating thread decodes the next piece
                if piece:
                    yield f"data: {json.dumps({'text': piece})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    import uvicorn

    import hetero_llm
    from hetero_llm.evaluate import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    hetero_llm.accelerate(model)
    print(model.hetero_plan)
    uvicorn.run(build_app(model, tokenizer), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
