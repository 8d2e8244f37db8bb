"""SmolLM2-135M split over two processes: tensor parallel (or pipeline parallel with --pp).

    torchrun --nproc-per-node 2 examples/parallel_smollm2.py        # tp=2
    torchrun --nproc-per-node 2 examples/parallel_smollm2.py --pp   # pp=2

Every rank runs this same script; each holds about half the weights, and every rank
generates the same text. On several machines, see docs/parallel.md.
"""
import sys

import torch
import torch.distributed as dist

import hetero_llm
from hetero_llm.evaluate import load_model

model, tokenizer = load_model("smollm2")
layout = {"pp": 2} if "--pp" in sys.argv else {"tp": 2}
hetero_llm.accelerate(model, **layout)
rank = dist.get_rank()
if rank == 0:
    print(model.hetero_plan.table().split("\n\n")[0])  # the header: per-rank shares
prompt = tokenizer("The three primary colors are", return_tensors="pt")
with torch.inference_mode():
    out = model.generate(**prompt, max_new_tokens=32, do_sample=False)
print(f"rank {rank}: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
