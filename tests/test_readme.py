"""The README and docs/ cannot drift (issues 17, 27): the options tables (docs/cli.md) are the
parsers' options, every ``bash``/``python`` block of README.md and docs/*.md runs as written, with
local stand-ins for hub ids (a tokenizer trained here, a tiny ``save_pretrained`` GPT-2, local
jsonl) and no network, and every relative link and #anchor points to a file and heading that exist.

The blocks run in one working folder, README first, then the pages in :data:`PAGES` order (a page
may use a store an earlier one built). A block that cannot run here carries
``<!-- readme-test: skip: WHY -->`` on the line before its fence; :data:`SKIPPED` lists them, so a
new skip is a visible change to this file.

Regenerate the options tables after changing a parser: ``python -m tests.test_readme --write``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPTIONS = DOCS / "cli.md"  # the options tables
#: the pages under docs/, in the order their blocks run (after README's); a new page is added here
PAGES = ["tokenize.md", "windows.md", "evaluate.md", "distributed.md", "lm-eval.md", "compare.md", "benchmarks.md",
         "formats.md", "safety.md", "cli.md", "layout.md", "design.md"]

#: first line of each block that is skipped, with the README's reason
SKIPPED = {
    "# 1. the main job on the embedded default: create .venv, install, tokenize the running Python's": "installs packages (.ci/setup)",
    ".venv/bin/python -m pytest -q -m cuda": "needs a GPU",
    ".venv/bin/python -m pytest -q tests/evaluator/test_architectures.py": "the test suite runs this file itself",
    "streameval demo --out runs/demo        # the embedded default: stdlib store + bundled model (CPU: 250,000 tokens)":
        "tokenizes the whole stdlib and scores 250,000 tokens (a minute or more on a CPU)",
    "python -m benchmarks                    # the suite: stages, verdict, sweeps, baselines, memory scaling":
        "minutes of measurement; tests/benchmarks runs every benchmark at toy sizes",
    "#!/bin/bash": "needs a SLURM cluster (the one-machine loop above runs the same commands)",
    "# one machine, 8 GPUs: one process per GPU (NCCL), each on cuda:LOCAL_RANK":
        "launches several processes (tests/evaluator/test_distributed.py runs 2 and 3 gloo processes)",
    "# needs accelerate (in the hf extra): layers spread over every visible GPU, then CPU RAM, then disk":
        "needs several GPUs (tests/evaluator/test_device_map.py runs a CPU + disk map)",
    "streamdata tokenize docs.jsonl --tokenizer ./my-model --eos none --out stores/docs   # the text only, no EOS/BOS added":
        "needs a model folder with its tokenizer (tests/evaluator/test_lmeval_parity.py runs this recipe)",
    "# here (network): wheels for the GPU machine's Python (3.12 here) and x86-64 Linux, no dependencies;":
        "downloads wheels and installs them on another machine",
}

#: hub ids and sizes in the README -> local stand-ins (the same words everywhere they appear)
STAND_INS = [
    ("wikitext --config wikitext-103-raw-v1 --split test", "wiki.jsonl"),
    ("--tokenizer gpt2", "--tokenizer ./tokenizer.json"),
    ("--model gpt2", "--model ./gpt2"),
    ("my-docs.jsonl", "wiki.jsonl"),
    ("--model ./my-model", "--model ./gpt2"),
    ("--reference gpt2", "--reference ./gpt2"),
    ('from_pretrained("gpt2")', 'from_pretrained("./gpt2")'),
    ('StreamingEvaluator("gpt2"', 'StreamingEvaluator("./gpt2"'),
    ("stdlib:eval --tokenizer default --out stores/stdlib", "stdlib:eval --tokenizer default --out stores/stdlib --max-docs 20"),
]

_OPT_BEGIN = re.compile(r"<!-- options: (.+?) -->\n")
_OPT_END = "<!-- /options -->"


# ---- options tables ------------------------------------------------------------------------------
def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every verb of every command line, by the name the README's table uses."""
    from benchmarks.suite import build_parser as bench_parser
    from evaluator.cli import build_parser as eval_parser
    from streamdata.cli import build_parser as data_parser

    out = {}
    for prog, p in (("streamdata", data_parser()), ("streameval", eval_parser())):
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        for verb, sp in sub.choices.items():
            out[f"{prog} {verb}"] = sp
    out["python -m benchmarks"] = bench_parser()
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def options_table(p: argparse.ArgumentParser) -> str:
    """A markdown table of a parser's arguments: option, default, meaning (its --help text)."""
    fmt = p._get_formatter()
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if a.option_strings:
            name = ", ".join(a.option_strings)
            if a.nargs != 0:
                name += " " + (a.metavar or a.dest.upper())
        else:
            name = (a.metavar or a.dest).upper() + ("..." if a.nargs in ("+", "*") else "")
        if a.required:
            default = "required"
        elif a.nargs == 0 or a.default is None or a.default == argparse.SUPPRESS:
            default = ""
        else:
            default = str(a.default)
        if a.choices and not isinstance(a, argparse._SubParsersAction):
            choices = " (" + " \\| ".join(str(c) for c in a.choices) + ")"
        else:
            choices = ""
        meaning = fmt._expand_help(a) if a.help else ""
        rows.append(f"| `{_cell(name)}` | {_cell(default) and '`' + _cell(default) + '`'} | {_cell(meaning)}{choices} |")
    return "\n".join(rows) + "\n"


def render_options(text: str) -> str:
    """``text`` with every options table regenerated from its parser."""
    ps = parsers()
    out, pos = [], 0
    for m in _OPT_BEGIN.finditer(text):
        end = text.index(_OPT_END, m.end())
        out += [text[pos : m.end()], options_table(ps[m.group(1)])]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def test_options_tables_match_the_parsers():
    text = OPTIONS.read_text(encoding="utf-8")
    names = _OPT_BEGIN.findall(text)
    assert sorted(names) == sorted(parsers()), "one options table per verb"
    assert render_options(text) == text, "docs/cli.md options tables are stale: python -m tests.test_readme --write"


# ---- code blocks ---------------------------------------------------------------------------------
_BLOCK = re.compile(r"(<!-- readme-test: skip: (.+?) -->\n)?```(bash|python)\n(.*?)```", re.S)


def pages() -> list[Path]:
    """README.md, then docs/*.md in the order their blocks run."""
    return [README] + [DOCS / name for name in PAGES]


def test_every_page_is_listed():
    assert sorted(PAGES) == sorted(p.name for p in DOCS.glob("*.md")), "add the new page to PAGES"


def blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) of every bash/python block, README's first, then each page's."""
    return [(m.group(3), m.group(4), m.group(2)) for page in pages()
            for m in _BLOCK.finditer(page.read_text(encoding="utf-8"))]


def test_skipped_blocks_are_the_listed_ones():
    skipped = {code.splitlines()[0]: why for _, code, why in blocks() if why}
    assert skipped == SKIPPED


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def test_setup_says_how_long_the_demo_and_the_tests_take():
    """The first command tells its time (issue 25): the set-up section states the demo's time on a
    CPU, measured, with the machine and the date, and on a GPU (or that it is not measured yet and
    which command records it); and the suite's times, whole and fast lane (issue 27)."""
    setup = " ".join(_section(README.read_text(encoding="utf-8"), "Set-up").split())
    assert "**How long the demo takes.**" in setup
    said = setup[setup.index("**How long the demo takes.**"):]
    assert re.search(r"Measured on a .{0,60}2-core.{0,80}\d{4}-\d\d-\d\d\)", said)  # the machine and the date
    assert re.search(r"\b\d+ s in all when the machine was quiet", said)
    gpu = said[said.index("On a GPU:"):]
    assert re.match(r"On a GPU: (\d+ s|not measured yet; `python -m benchmarks\.gpu_check)", gpu)
    assert re.search(r"the whole suite takes about [\d.]+ minutes \(\d+ tests, \d+ s measured", setup)
    assert re.search(r'`\.venv/bin/python -m pytest -q -m "not slow"` is the fast lane \(\d+ tests, \d+ s\)', setup)


_FENCED = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The ids GitHub gives a page's headings: lower case, punctuation other than '-' and '_'
    dropped, spaces as '-'; a repeated id gets -1, -2, ..."""
    seen: dict[str, int] = {}
    for line in _FENCED.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            seen[slug if slug not in seen else f"{slug}-{seen[slug]}"] = 0
            seen[slug] = seen.get(slug, 0) + 1
    return set(seen)


def test_anchor_ids_are_githubs():
    ids = anchors(README)
    assert {"set-up-on-a-fresh-machine-two-commands", "resume-a-long-run", "documentation"} <= ids
    assert {"python--m-benchmarks", "streameval-demo"} <= anchors(OPTIONS)


def test_every_link_resolves_and_every_page_is_linked_from_the_readme():
    linked = set()
    for page in pages():
        text = re.sub(r"`[^`\n]*`", "", _FENCED.sub("", page.read_text(encoding="utf-8")))  # links outside code
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto: (not checked: no network)
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            assert dest.exists(), f"{where} points to a missing file"
            if anchor:
                assert dest.suffix == ".md" and anchor in anchors(dest), f"{where} points to a missing heading"
            if page == README:
                linked.add(dest)
    assert {DOCS / name for name in PAGES} <= linked, "every page under docs/ is linked from README.md"


def _stand_ins(work: Path) -> None:
    """The files the README's commands name, built locally: corpus, tokenizer, models, a factory."""
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    from .conftest import CORPUS, train_bpe

    rng = np.random.default_rng(0)
    words = " ".join(CORPUS).split()
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(20, 200, size=48)]
    # small: the README's gpt2 runs use 1024-token windows; corpus/ needs >= 9192 tokens (store.read(1000, 9192))
    (work / "wiki.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:16]), encoding="utf-8")
    (work / "corpus").mkdir()
    for i in range(2):
        (work / "corpus" / f"part{i}.jsonl").write_text(
            "".join(json.dumps({"content": t}) + "\n" for t in texts[i::2]), encoding="utf-8")
    train_bpe(work / "tokenizer.json", texts, vocab_size=300)
    import torch

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=1024, vocab_size=300, bos_token_id=None, eos_token_id=None)
    for name in ("gpt2", "my-checkpoint"):
        GPT2LMHeadModel(cfg).save_pretrained(work / name)
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "models.py").write_text(
        "import torch\n\n\n"
        "class GRULM(torch.nn.Module):\n"
        "    def __init__(self, vocab=300, hidden=16):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.emb, self.rnn = torch.nn.Embedding(vocab, hidden), torch.nn.GRU(hidden, hidden, batch_first=True)\n"
        "        self.head, self.h = torch.nn.Linear(hidden, vocab), None\n\n"
        "    def forward(self, x):\n"
        "        y, self.h = self.rnn(self.emb(x), self.h)\n"
        "        return self.head(y)\n\n"
        "    def get_state(self):\n"
        "        return self.h\n\n"
        "    def set_state(self, s):\n"
        "        self.h = s\n\n"
        "    def reset_state(self):\n"
        "        self.h = None\n\n\n"
        "def build():\n"
        "    return GRULM()\n")


def _localize(code: str) -> str:
    for old, new in STAND_INS:
        code = code.replace(old, new)
    return code


def test_bare_commands_come_after_the_note_on_activating_the_environment():
    """A newcomer pasting `streamdata ...` got "command not found": the set-up section must say
    once, before the first bare command, how the commands are meant to run."""
    text = README.read_text(encoding="utf-8")
    note = text.find("source .venv/bin/activate")
    first = min(i for i in (text.find("\nstreamdata "), text.find("\nstreameval "), text.find("\npython -m ")) if i >= 0)
    assert 0 <= note < first
    assert "Quick start" in text[:first + 400]


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_every_readme_block_runs(tmp_path):
    pytest.importorskip("transformers")
    work = tmp_path / "readme"
    work.mkdir()
    _stand_ins(work)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ran = 0
    for lang, code, skip in blocks():
        if skip:
            continue
        code = _localize(code)
        if lang == "bash":
            cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
        else:
            cmd = [sys.executable, "-c", code]
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{lang} block failed:\n{code}\n--- stderr:\n{p.stderr[-3000:]}"
        ran += 1
    assert ran == len(blocks()) - len(SKIPPED)
    assert (work / "runs" / "gpt2-wt103" / "results.json").is_file()
    assert (work / "stores" / "code2" / "manifest.json").is_file()


if __name__ == "__main__":  # python -m tests.test_readme --write: regenerate the options tables in docs/cli.md
    if sys.argv[1:] == ["--write"]:
        OPTIONS.write_text(render_options(OPTIONS.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        sys.exit("usage: python -m tests.test_readme --write")
