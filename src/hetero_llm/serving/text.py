"""What every server in front of a causal LM does with one text request, whatever the transport
(HTTP in examples/serve_http.py, Triton Inference Server in triton_server.py): the prompt's token
ids, the context-length check, and the arguments of a greedy generate()."""
from __future__ import annotations

import torch


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids (1, n) of one prompt, wrapped in the tokenizer's chat template if `chat`."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def context_problem(model, prompt_tokens: int, max_new_tokens: int) -> str | None:
    """Why the prompt plus the new tokens do not fit the model's context, or None if they do."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + max_new_tokens > context:
        return (f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                f"model's context of {context} tokens")
    return None


def greedy_kwargs(ids: torch.Tensor, max_new_tokens: int) -> dict:
    """generate()'s arguments for one unpadded prompt, greedy: the answer is reproducible."""
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
