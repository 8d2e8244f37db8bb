"""Fused nn.Modules and the pass that swaps them in.

One module does the work of several of transformers' (q/k/v as one matmul and one rotary
pass, gate/up as one matmul, a norm in one op, a whole decoder layer's forward), calling the
ops of `hetero_llm.kernels`; `apply.kernels_pass` puts them where the plan says, and
`attention_interface` registers hetero_llm's attention with transformers.
"""
