"""An accelerated SmolLM2 served by NVIDIA Triton Inference Server, through PyTriton.

    pip install "hetero_llm[triton]"       # nvidia-pytriton (ships tritonserver); numpy<2
    python examples/serve_triton.py [--port 8000]   # until Ctrl-C or SIGTERM
    curl -s localhost:8000/v2/models/smollm2/infer -d '{"inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["What is the capital of France?"]},
        {"name": "max_new_tokens", "shape": [1], "datatype": "INT32", "data": [32]}]}'

The model "smollm2" takes `prompt` (BYTES, one or more UTF-8 prompts) and optionally
`max_new_tokens` (INT32, shape [1], default 64); it answers `text` (BYTES, one completion per
prompt). Decoding is greedy and each prompt is generated alone, so the text is exactly what
model.generate() returns for it. Prompts are wrapped in the model's chat template unless
--no-chat. HTTP (KServe v2) on --port, gRPC on --grpc-port, Prometheus metrics on --metrics-port.
From Python: pytriton.client.ModelClient("localhost:8000", "smollm2").infer_sample(...).
"""
from __future__ import annotations

import argparse
import signal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP (KServe v2) port")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-name", default="smollm2")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="when a request gives none")
    parser.add_argument("--no-chat", action="store_true", help="complete raw prompts, no chat template")
    parser.add_argument("--instances", type=int, default=1,
                        help="generations run at once (one already keeps a small CPU busy)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from pytriton.triton import TritonConfig

    import hetero_llm
    from hetero_llm.evaluate import load_model
    from hetero_llm.serving.triton_server import bind_text_generation, started_triton

    args = parse_args(argv)
    model, tokenizer = load_model("smollm2")
    hetero_llm.accelerate(model)
    print(model.hetero_plan)
    config = TritonConfig(http_address=args.host, http_port=args.port, grpc_address=args.host,
                          grpc_port=args.grpc_port, metrics_address=args.host, metrics_port=args.metrics_port)
    with started_triton(config) as triton:
        bind_text_generation(triton, model, tokenizer, model_name=args.model_name,
                             default_max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                             instances=args.instances)
        # SIGTERM (docker stop, systemd, kill) stops the server as Ctrl-C does: without this the
        # process would die at once, and tritonserver (sent SIGTERM by the kernel when its parent
        # dies) would leave its copy of the binaries behind in ~/.cache/pytriton.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        print(f"serving {args.model_name!r}: POST http://{args.host}:{args.port}/v2/models/{args.model_name}/infer"
              " (Ctrl-C to stop)", flush=True)
        triton.serve()  # returns on Ctrl-C (SIGINT) or SIGTERM, having stopped the server


if __name__ == "__main__":
    main()
