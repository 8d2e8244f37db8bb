"""Every command and snippet in README.md and docs/*.md runs as written.

Fenced blocks:
- ```python and ```bash blocks run; ```text blocks are illustrations (output samples, diagrams)
  and must not hide a command. A fence without a language fails.
- A block is left out only by an HTML comment on the line right before its fence:
  `<!-- docs-test: gpu -->` (needs CUDA: skipped without one, run with one) or
  `<!-- docs-test: skip: <reason> -->`. Anything else that cannot run fails.
- The python blocks of one page run in order in one fresh subprocess (a page defines
  `model, tokenizer` once, in a setup block readers see too), in a temporary directory.
  A python block whose first line is `# <name>.py` is a file the reader saves: it is written
  beside the commands, not run as a snippet, and a command of its page must run it.
- Each command of a bash block runs through the shell from the repository root and must exit 0.
  `python`, `pip`, `hetero-llm`, `torchrun` and `pytest` are this interpreter's (so the
  transformers release under test is the one the commands use). A ```text block right after a
  one-command bash block is what that command prints: each of its lines must appear in the
  output, in order (`...` stands for anything; runs of spaces compare as one).
- Heavy commands get workload-size flags appended (SIZE_FLAGS; argparse: a later flag wins): the
  same code paths at toy sizes. The full-size runs are checked by hand; the docs give their
  figures and the command that produced them.
- Placeholders readers substitute (PLACEHOLDERS) become SmolLM2's directory or config files of
  Llama-3-8B / 70B shapes written here (`hetero-llm plan` on a config.json plans on the meta device).

Inline commands: every code span in prose that starts with `python `, `hetero-llm `, `bash ` or
`torchrun ` and names a script or command of this repository must either be run by a fenced block
(the same words once the size flags are applied) or be listed in INLINE, which runs it or says
why not. `[...]` in a span is usage notation for optional arguments and is left out; a bare
`hetero-llm <command>` names the command and is covered by any run of it.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
RUNNABLE = ("python", "bash")
ILLUSTRATION = ("text",)
MARKER = re.compile(r"^<!-- docs-test: (gpu|skip: (?P<reason>.+?)) -->$")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
MAX_SKIPS = 10  # blocks and inline commands left out with a reason: only what cannot run here at all
PAGE_TIMEOUT_S = 420
COMMAND_TIMEOUT_S = 420
HAS_CUDA = __import__("torch").cuda.is_available()

# Workload-size flags appended to heavy commands (matched on their first words). argparse takes
# the last value of a repeated flag, so these override what the docs write; every code path still
# runs, on fewer tokens, rounds and samples. `{out}` is a temporary directory for outputs.
BENCH = ["--repeats", "1", "--new-tokens", "8", "--prompt-len", "64", "--ppl-tokens", "256", "--quiet",
         "--out", "{out}"]
SIZE_FLAGS = {
    ("hetero-llm", "bench"): BENCH,
    ("bash", "scripts/demo.sh"): BENCH,  # passes its arguments to `hetero-llm bench`
    ("hetero-llm", "check-predictions"): ["--repeats", "1", "--new-tokens", "4", "--prompt-len", "32", "--quiet"],
    ("hetero-llm", "eval"): ["--max-tokens", "256", "--quiet"],  # 128 agreement tokens: the verdict's bar
    ("python", "benchmarks/cpu_prune.py"): ["--repeats", "1", "--tokens", "4", "--calibration", "2",
                                            "--seq-len", "64", "--ppl-tokens", "256"],
    # Two of the eight schemes (group scales with a zero point; W8A8 calibrated with outlier channels):
    # every path of the script, beside fp32 and quantize_dynamic; tests/quant checks each scheme.
    ("python", "benchmarks/cpu_quant_schemes.py"): ["--repeats", "1", "--new-tokens", "4", "--prompt-len", "32",
                                                    "--ppl-tokens", "256", "--calibration", "2", "--only",
                                                    "int8-asym g128", "w8a8 smooth 0.5 + 8 fp channels"],
    ("python", "benchmarks/cpu_1b_shape.py"): ["--layers", "1", "--repeats", "1", "--new-tokens", "4",
                                              "--prompt-len", "32"],
    # Without --llama-cpp: the original and hetero_llm only (the peers are never installed here).
    ("python", "benchmarks/cpu_peers.py"): ["--repeats", "1", "--new-tokens", "4", "--prompt-len", "32",
                                           "--ppl-tokens", "0"],
    ("python", "benchmarks/cpu_parallel.py"): ["--rounds", "1", "--tokens", "4", "--quantize", "int8"],
    ("python", "benchmarks/cpu_concurrency.py"): ["--rounds", "1", "--tokens", "4", "--threads", "2"],
    ("python", "examples/prune_smollm2.py"): ["--calibration", "2"],
    ("python", "scripts/check_families.py"): ["--only", "llama,gpt2"],  # the sweep on two families
}
VALUELESS = {"--quiet"}  # size flags that take no value
# `hetero-llm <command>` without a model means smollm2 (its argparse default), written out here.
DEFAULT_MODEL = {("hetero-llm", "bench"), ("hetero-llm", "eval"), ("hetero-llm", "check-predictions")}
# Commands whose whole run is part of another one's, which runs: not run twice.
COVERED_BY = {
    "hetero-llm bench smollm2": "bash scripts/demo.sh",  # demo.sh ends with `hetero-llm bench smollm2 "$@"`
    "hetero-llm bench smollm2 --onnx": "hetero-llm bench smollm2 --onnx both",  # both: float, plus int8
}

# What readers substitute, and what this test puts there.
PLACEHOLDERS = {
    "path/to/llama-3-8b/config.json": "{configs}/llama-3-8b/config.json",
    "path/to/llama-3-70b/config.json": "{configs}/llama-3-70b/config.json",
    "path/to/config.json": "{smollm2}/config.json",
    "path/to/model": "{smollm2}",
    "<stage>": "check",
}
# Llama 3's published shapes (config.json of meta-llama/Meta-Llama-3-8B and -70B: bf16 weights).
LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
              bos_token_id=128000, eos_token_id=128001, dtype="bfloat16")
LLAMA3_SHAPES = {"llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32),
                 "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                     num_attention_heads=64)}

# Benchmarks for a GPU: their commands run only with CUDA (a --smoke run is their CPU path).
GPU_SCRIPTS = ("benchmarks/e2e_gpu.py", "benchmarks/gpu_kernels.py", "benchmarks/e2e_prefill_gpu.py",
               "benchmarks/split_gpu.py", "benchmarks/gpu_int8_linear.py", "benchmarks/gpu_session.sh",
               "benchmarks/gpu_check.sh")
# Inline commands (code spans in prose) that no fenced block runs: None runs it (size flags
# apply), "gpu" runs it only with CUDA, any other text says why it is not run.
INLINE = {
    "python examples/prune_smollm2.py": None,
    "python examples/fast_generate.py": None,
    "python examples/fused_kernels.py": None,
    "torchrun --nproc-per-node 2 examples/parallel_smollm2.py": None,
    "hetero-llm bench smollm2 --onnx both --repeats 3 --new-tokens 64": None,
    "python benchmarks/cpu_quant_schemes.py --repeats 3": None,
    "python benchmarks/cpu_parallel.py --rounds 2 --tokens 48": None,
    "python benchmarks/cpu_prune.py": None,
    "python benchmarks/cpu_prune.py --all": "the full table: six prunings more than the default run, which "
                                            "runs here (the same functions, fewer configurations)",
    "python benchmarks/cpu_concurrency.py": None,
    "python benchmarks/cpu_1b_shape.py": None,
    "python benchmarks/cpu_peers.py": None,
    "python benchmarks/e2e_gpu.py --smoke": None,  # the GPU benchmark's CPU path, "in seconds"
    "python scripts/check_families.py [--json out.json]": None,
    "python benchmarks/gpu_int8_linear.py": "gpu",
    "python benchmarks/gpu_int8_linear.py [--json out.json]": "gpu",
    "python benchmarks/gpu_kernels.py [--json out.json]": "gpu",
    "python benchmarks/e2e_prefill_gpu.py": "gpu",
    "bash benchmarks/gpu_session.sh <stage>": "gpu",
}


# --- reading the pages ------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None  # "gpu", "skip: <reason>" or None
    output: tuple[str, ...] | None = None  # a ```text block right after this one-command bash block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        return self.marker[len("skip: "):] if self.marker and self.marker.startswith("skip: ") else None

    @property
    def file_name(self) -> str | None:
        """`run_tp.py` for a python block that starts with `# run_tp.py`: a file, not a snippet."""
        m = re.match(r"# (\S+\.py)\s*$", self.text.split("\n", 1)[0])
        return m.group(1) if self.lang == "python" and m else None


@functools.lru_cache(maxsize=None)
def blocks(page: Path) -> tuple[Block, ...]:
    lines = page.read_text().split("\n")
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{page.name}:{start + 1}: a fence that never closes"
        prev = MARKER.match(lines[start - 1]) if start else None
        found.append((start, i, Block(page, start + 1, m.group("lang"), "\n".join(body),
                                      prev.group(1) if prev else None)))
        i += 1
    out = []
    for k, (start, end, b) in enumerate(found):
        nxt = found[k + 1] if k + 1 < len(found) else None
        if (b.lang == "bash" and nxt and nxt[2].lang == "text" and len(commands(b)) == 1
                and not "".join(lines[end + 1:nxt[0]]).strip()):
            b = Block(b.page, b.line, b.lang, b.text, b.marker, tuple(nxt[2].text.split("\n")))
        out.append(b)
    return tuple(out)


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def inline_commands(page: Path) -> list[str]:
    """Code spans in prose that run one of this repository's scripts or commands."""
    found = []
    for span in re.findall(r"`([^`]+)`", prose(page)):
        span = " ".join(span.split())
        words = span.split()
        if words[0] == "hetero-llm" or (words[0] in ("python", "bash", "torchrun")
                                        and any((REPO / w).is_file() for w in words[1:])):
            found.append(span)
    return found


def commands(block: Block) -> list[str]:
    """The shell commands of a bash block: continuation lines and open quotes joined."""
    out, pending = [], ""
    for line in block.text.split("\n"):
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            out.append(pending)
        pending = ""
    assert not pending, f"{block.where}: unfinished command {pending!r}"
    return out


# --- the words that run -----------------------------------------------------------------------

def _key(words: list[str]) -> tuple[str, ...] | None:
    for key in SIZE_FLAGS:
        if tuple(words[:len(key)]) == key:
            return key
    return None


def effective(command: str) -> tuple[str, ...]:
    """The words that run: the command without its comment and `[...]` usage notation, the default
    model written out, plus its size flags. Flags the size flags override are dropped first, so
    commands that differ only in them run once."""
    words = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command), comments=True)
    if tuple(words[:2]) in DEFAULT_MODEL and (len(words) == 2 or words[2].startswith("-")):
        words.insert(2, "smollm2")
    key = _key(words)
    if key is None:
        return tuple(words)
    flags = SIZE_FLAGS[key]
    overridden = {f for f in flags if f.startswith("--")}
    kept, i = [], 0
    while i < len(words):
        if words[i] in overridden:
            i += 1 if words[i] in VALUELESS else 2
            continue
        kept.append(words[i])
        i += 1
    return tuple(kept + flags)


def is_gpu_command(words: tuple[str, ...]) -> bool:
    if "--smoke" in words:  # the GPU benchmarks' CPU path
        return False
    return any(w in GPU_SCRIPTS for w in words) or ("-m" in words and "gpu" in words)


def is_name_only(span: str) -> bool:
    """`hetero-llm bench` in prose names the command; it is not an invocation."""
    return span.split()[0] == "hetero-llm" and len(span.split()) == 2


@dataclass
class Run:
    words: tuple[str, ...]
    where: str
    gpu: bool
    page: Path | None = None
    output: tuple[str, ...] | None = None
    covers: list[str] = field(default_factory=list)


def fenced_commands() -> list[tuple[Block, str]]:
    return [(b, c) for b in all_blocks() if b.lang == "bash" for c in commands(b)]


@functools.lru_cache(maxsize=None)
def runs() -> tuple[Run, ...]:
    """Each distinct command once: fenced commands first, then the inline ones INLINE runs."""
    by_words: dict[tuple[str, ...], Run] = {}
    for b, c in fenced_commands():
        words = effective(c)
        if b.skip_reason:
            continue
        if words in by_words:  # run once; an output shown under either copy is checked
            by_words[words].output = by_words[words].output or b.output
            continue
        by_words[words] = Run(words, f"{b.where} {' '.join(shlex.split(c, comments=True))}",
                              b.marker == "gpu" or is_gpu_command(words), b.page, b.output)
    for c, why in INLINE.items():
        words = effective(c)
        if why in (None, "gpu") and words not in by_words:
            by_words[words] = Run(words, f"inline {c}", why == "gpu" or is_gpu_command(words))
    for covered, by in COVERED_BY.items():
        if effective(by) in by_words:  # else test_covering_commands_contain_what_they_cover fails
            by_words[effective(by)].covers.append(covered)
            by_words.pop(effective(covered), None)
    return tuple(by_words.values())


def run_words() -> set[tuple[str, ...]]:
    return {r.words for r in runs()} | {effective(c) for r in runs() for c in r.covers}


# --- what the placeholders become, and the shell's environment -------------------------------

@pytest.fixture(scope="session")
def places(tmp_path_factory) -> dict[str, str]:
    from transformers import LlamaConfig

    from hetero_llm.evaluate import load_model, smollm2_dir

    configs = tmp_path_factory.mktemp("configs")
    for name, shape in LLAMA3_SHAPES.items():
        LlamaConfig(**LLAMA3, **shape).save_pretrained(configs / name)
    if not (Path(smollm2_dir()) / "model.safetensors").exists():
        load_model("smollm2")  # converts the bundled GGUF to safetensors, once
    return {"configs": str(configs), "smollm2": str(smollm2_dir())}


def substitute(text: str, places: dict[str, str]) -> str:
    for placeholder in sorted(PLACEHOLDERS, key=len, reverse=True):
        text = text.replace(placeholder, PLACEHOLDERS[placeholder].format(**places))
    left = re.findall(r"path/to/[\w./-]*", text)
    assert not left, f"placeholders without a value in PLACEHOLDERS: {left}"
    return text


@pytest.fixture(scope="session")
def shims(tmp_path_factory) -> Path:
    """A bin directory that makes the shell's python, pip, hetero-llm, torchrun and pytest this
    interpreter's (the oldest-transformers virtualenv has no hetero-llm script of its own)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, run in {"python": "", "python3": "", "pip": "-m pip", "hetero-llm": "-m hetero_llm.cli",
                      "torchrun": "-m torch.distributed.run", "pytest": "-m pytest"}.items():
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {run} "$@"\n')
        shim.chmod(0o755)
    return bin_dir


def environment(shims: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _squeeze(line: str) -> str:
    return " ".join(line.split())


def assert_printed(expected: tuple[str, ...], stdout: str, where: str) -> None:
    """Each expected line appears in `stdout`, in order; `...` matches anything."""
    lines = [_squeeze(line) for line in stdout.splitlines()]
    at = 0
    for want in (_squeeze(e) for e in expected):
        if want == "...":
            continue
        pattern = re.compile(".*".join(re.escape(part.strip()) for part in want.split("...")))
        for i in range(at, len(lines)):
            if pattern.search(lines[i]):
                at = i + 1
                break
        else:
            raise AssertionError(f"{where}: the docs show {want!r}, which the command no longer prints "
                                 f"(after line {at}):\n{stdout[-3000:]}")


# --- the checks -------------------------------------------------------------------------------

def test_every_fence_is_labelled():
    wrong = [f"{b.where}: ```{b.lang}" for b in all_blocks() if b.lang not in RUNNABLE + ILLUSTRATION]
    assert not wrong, f"label every fence: ```python / ```bash run, ```text is an illustration: {wrong}"


COMMANDLIKE = re.compile(r"^\s*(\$ |(python3?|hetero-llm|bash|torchrun|pip|pytest|curl) \S)")


def test_illustrations_hide_no_commands():
    hidden = [f"{b.where}: {line.strip()}" for b in all_blocks() if b.lang in ILLUSTRATION
              for line in b.text.split("\n") if COMMANDLIKE.match(line)]
    assert not hidden, f"a command in a ```text block never runs: put it in a ```bash block: {hidden}"


def test_markers_sit_on_runnable_fences_and_skips_are_few():
    for page in PAGES:
        lines = page.read_text().split("\n")
        for i, line in enumerate(lines):
            if "docs-test" in line:
                assert MARKER.match(line), f"{page.name}:{i + 1}: malformed marker {line!r}"
                assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), \
                    f"{page.name}:{i + 1}: a marker goes on the line right before a fence"
    marked = [b for b in all_blocks() if b.marker]
    assert all(b.lang in RUNNABLE for b in marked), [b.where for b in marked if b.lang not in RUNNABLE]
    skips = [b.where for b in marked if b.skip_reason] + [c for c, why in INLINE.items() if why not in (None, "gpu")]
    assert len(skips) <= MAX_SKIPS, f"{len(skips)} skips: {skips}"
    vague = [b.where for b in marked if b.skip_reason and len(b.skip_reason.split()) < 5]
    assert not vague, f"say specifically why these do not run: {vague}"


def test_every_saved_file_is_run_by_a_command():
    for b in all_blocks():
        if b.file_name and not b.skip_reason:
            assert any(r.page == b.page and b.file_name in r.words for r in runs()), \
                f"{b.where}: {b.file_name} is saved but no command of its page runs it"


def test_inline_commands_are_run_or_listed():
    ran = run_words()
    unlisted = [f"{page.name}: {c}" for page in PAGES for c in inline_commands(page)
                if c not in INLINE and effective(c) not in ran
                and not (is_name_only(c) and any(w[:2] == tuple(c.split()) for w in ran))]
    assert not unlisted, f"inline commands neither run by a fenced block nor listed in INLINE: {unlisted}"
    everywhere = {c for page in PAGES for c in inline_commands(page)}
    stale = [c for c in list(INLINE) + list(COVERED_BY) if c not in everywhere
             and effective(c) not in {effective(f) for _, f in fenced_commands()}]
    assert not stale, f"INLINE / COVERED_BY list commands no page has any more: {stale}"


def test_gpu_commands_are_marked():
    for b, c in fenced_commands():
        if is_gpu_command(effective(c)):
            assert b.marker == "gpu" or b.skip_reason, f"{b.where}: `{c}` needs a GPU: mark the block gpu"
    for c, why in INLINE.items():
        assert not is_gpu_command(effective(c)) or why is not None, f"INLINE: `{c}` needs a GPU: say 'gpu'"


def test_covering_commands_contain_what_they_cover():
    demo = (REPO / "scripts" / "demo.sh").read_text().strip().splitlines()[-1]
    assert demo == 'hetero-llm bench smollm2 "$@"', "COVERED_BY relies on demo.sh ending with this"
    for covered, by in COVERED_BY.items():
        assert any(r.words == effective(by) for r in runs()), f"{by} (covering {covered}) does not run"


def _python_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang == "python" and not b.skip_reason and not b.file_name
                                    for b in blocks(p))]


RUNNER = r"""
import json, sys
ns = {"__name__": "__main__"}
for where, path, line, src in json.load(open(sys.argv[1])):
    print(f"--- docs-test: {where}", flush=True)
    exec(compile("\n" * line + src, path, "exec"), ns)
"""


@pytest.mark.parametrize("page", _python_pages(), ids=lambda p: p.name)
def test_python_blocks_of_a_page_run_in_order(page, places, shims, tmp_path):
    run, left_out = [], []
    for b in blocks(page):
        if b.lang != "python" or b.file_name:
            continue
        if b.skip_reason or (b.marker == "gpu" and not HAS_CUDA):
            left_out.append(b.where)
        else:  # line numbers in tracebacks are the page's
            run.append((b.where, str(b.page), b.line, substitute(b.text, places)))
    (tmp_path / "blocks.json").write_text(json.dumps(run))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=tmp_path,
                          env=environment(shims), capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
    assert proc.returncode == 0, f"{page.name} (left out: {left_out}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize("run", runs(), ids=lambda r: r.where)
def test_command_runs(run, places, shims, tmp_path):
    if run.gpu and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    files = {b.file_name: b for b in (blocks(run.page) if run.page else ()) if b.file_name}
    words = []
    for w in run.words:
        if w in files:  # a file saved from a python block of the page
            (tmp_path / w).write_text(substitute(files[w].text, places) + "\n")
            w = str(tmp_path / w)
        words.append(w.replace("{out}", str(tmp_path / "out")))
    line = substitute(shlex.join(words), places)
    proc = subprocess.run(["bash", "-c", line], cwd=REPO, env=environment(shims), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, f"`{line}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    if run.output:
        assert_printed(run.output, proc.stdout, run.where)
