"""Serving helpers: put an accelerated model behind an inference server.

Nothing here is imported by ``import hetero_llm``; each submodule imports its server's
package (PyTriton, ...) only when called, so hetero_llm installs and imports without them.

- ``hetero_llm.serving.text``: per request, whatever the server: prompt ids, context check,
  greedy generate() arguments.
- ``hetero_llm.serving.triton_server``: NVIDIA Triton Inference Server through PyTriton.
"""
