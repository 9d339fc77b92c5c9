"""Every fenced code block of README.md and docs/*.md is run here, or marked in its page as not runnable on the
test machines, with the reason.

Sybil's Markdown lexers find the blocks and the marks; the tests drive them, one page at a time, in a folder of
the page's own under pytest's temporary folder (its `data/` the tiny IDX files of tests/conftest.py's
write_dataset). `python -m src.X` runs in this process (runpy), as many commands share one process; what needs
processes of its own (DDP, the joblib and submitit launchers, servers) runs as subprocesses: those of DDP and the
launchers while the page goes on, judged when it ends; the servers waited for until they answer, and stopped by
pid when the page is done. A block that shows output (a ```text block right after a command, or a ```console
block of `$ command` lines and what each printed) is compared by its shape: the same lines in the same order,
numbers, dates, paths and class names matched by pattern (the page's figures come from the full datasets).
An example that shows an error must end with that error and a non-zero exit status, every other one with 0.
What the tests change in the pages' commands is in the tables below (ADDED, PLACEHOLDERS, PRELUDES), nowhere else.

A mark is an HTML comment right before the block, invisible on the site and on GitHub:

    <!-- not-run: REASON -->                  the whole block
    <!-- not-run: lines 1, 3-4: REASON -->    those lines of it (counted from the block's first line)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, SUMMARY, entry_env, free_port, needs, needs_extra, write_dataset

# README.md last: the front page shows commands of the pages, and a command of it that a page ran already in this
# session (with no output of its own to compare) is not run again (FRONT_PAGE).
PAGES = [*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "README.md"]
FRONT_PAGE = "README.md"

# ---------------------------------------------------------------------------------------------------------------
# What the tests change in the pages' commands, and why: the one place where they differ from what a user types.
# (regex searched in the command as the page writes it, what is added: a key=value replaces the command's own
# value of that key, anything else is appended; why)
ADDED = [
    (r"^python -m src\.(train|tune)\b.*(data\.val_size=10000|\+sweep=grid)|^python -m src\.tune\b(?!.*data\.val_size)",
     ["data.data_dir=data-val"],
     "10,000 validation images held out, as the page does: data-val/ has 10,600 training images, so 600 train"),
    (r"^python -m src\.train -m\b", ["trainer.max_epochs=1"], "a sweep's jobs: 1 epoch each"),
    (r"^python -m src\.train -m (?!.*logger=).*model\.hidden=128,512|^python -m src\.train -m \+sweep=grid$", ["model.hidden=128"],
     "half a grid's jobs: model.hidden=128 only, its other rows as they are"),
    (r"hydra/launcher=(joblib|submitit_local)\b", ["optimizer.lr=1e-3", "model.hidden=128"],
     "a job in a process of its own: one of the grid's 3 x 2"),
    (r"trainer=ddp_cpu\b", ["trainer.max_epochs=1"], "two processes talking through gloo: 1 epoch"),
    (r"^python -m src\.tune( data=fashion_mnist|$)", ["hparams_search.n_trials=1"], "1 trial, not 20"),
    (r"^python -m src\.tune hparams_search\.n_trials=40", ["hparams_search.n_trials=2"],
     "the same study resumed: 1 more trial, not 20"),
    (r"^python -m src\.tune '\+hparams_search", ["hparams_search.n_trials=1", "hparams_search.study_name=rho"],
     "1 trial, in a study of its own: the page's first commands filled mnist-mlp"),
    (r"^python -m src\.tune data\.val_size=100 ", ["hparams_search.study_name=tiny"],
     "its 4 trials in a study of their own, as the page measured them: mnist-mlp holds the commands' above"),
    (r"^python -m src\.app\b", ["port=FREE"], "a free port on 127.0.0.1, standing for the page's 7860 or 8000"),
    (r"^python -m mkdocs serve\b", ["--dev-addr=127.0.0.1:FREE"], "a free port, standing for the page's 8000"),
    (r"^jupyter notebook\b", ["--no-browser", "--port=FREE", "--ServerApp.ip=127.0.0.1", "--allow-root"],
     "no browser to open; a free port on 127.0.0.1; the test machines may run as root, which Jupyter refuses unasked"),
    (r"^tensorboard\b", ["--host=127.0.0.1", "--port=FREE"], "a free port on 127.0.0.1, standing for 6006"),
]
# Paths and addresses the pages write for "yours": (regex, what stands for it, why).
PLACEHOLDERS = [
    (r"outputs/2026-01-01/12-00-00/checkpoints/last\.ckpt", "FIRST:last.ckpt", "last.ckpt of the page's first run"),
    (r"outputs/2026-01-01/12-00-00/checkpoints/best-epoch05-val_acc0\.8724\.ckpt", "FIRST:best-*.ckpt",
     "best-*.ckpt of the page's first run that has one"),
    (r"/path/to/mnist-files", "idx-files", "a folder holding the four IDX files, as the page says"),
    (r"http://127\.0\.0\.1:7860", "SERVED:7860", "the page's server, on the port it was given"),
]
# Pages whose shown output comes "right after" a command their prose names (the page's own words in the comment).
PRELUDES = {
    "docs/evaluate.md": ["python -m src.train data=fashion_mnist data.val_size=10000"],  # "Right after the run ..."
    "docs/export.md": ["python -m src.train data=fashion_mnist"],  # "Right after `python -m src.train data=fashion_mnist`"
    "docs/app.md": ["python -m src.train"],  # "the newest last.ckpt under outputs/": any training run
}
# Commands that need processes of their own (Lightning's DDP starts its other process by running the command line
# again; a launcher's jobs run in other processes); servers are told by SERVER.
OWN_PROCESS = re.compile(r"trainer=ddp_cpu\b|hydra/launcher=(joblib|submitit_local)\b")
SERVER = re.compile(r"^(python -m src\.app|python -m mkdocs serve|jupyter notebook|tensorboard)\b")
# A server whose serving does not depend on the page's folder runs once per session (it serves the repository).
SESSION_SERVER = re.compile(r"^python -m mkdocs serve\b")
# Servers whose serving does not depend on what the page's commands before them write: started when the page
# starts, so that they come up while its other commands run (each still waited for when its block comes).
EARLY_SERVER = re.compile(r"^(python -m mkdocs serve|jupyter notebook|tensorboard)\b")
# Commands run only where they can show what the page shows: (regex, whether it can, why not otherwise).
ONLY_WHERE = [
    (r"device=cuda\b", lambda: not cuda_available(), "shows what a machine without CUDA says"),
]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# The pages' blocks and marks, found by Sybil's lexers.

@dataclass
class Block:
    page: str
    line: int  # of the opening fence
    language: str
    source: str
    marks: list = field(default_factory=list)  # (set of block lines or None for all, reason)
    before: str = ""  # the page's text between the previous block and this one

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def marked(self, line: int | None = None) -> str | None:
        """The reason why the block (or its line `line`, counted from 1) is not run, or None."""
        for lines, reason in self.marks:
            if lines is None or (line is not None and line in lines):
                return reason
        return None


MARK = re.compile(r"(?:lines? (?P<lines>[\d ,-]+): )?(?P<reason>.+)", re.S)


def page_blocks(page: str) -> list[Block]:
    needs_extra("dev", "sybil")
    from sybil import Document
    from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, RawFencedCodeBlockLexer

    fences = RawFencedCodeBlockLexer(info_pattern=re.compile(r"(?P<language>[^\n]*)$\n", re.M),
                                     mapping={"language": "language", "source": "source"})
    marks = DirectiveInHTMLCommentLexer("not-run", arguments=".+?")

    def blocks(document):
        for region in fences(document):
            region.parsed = ("block", region.lexemes["language"].strip(), str(region.lexemes["source"]))
            yield region

    def mark_regions(document):
        for region in marks(document):
            region.parsed = ("mark", region.lexemes["arguments"].strip())
            yield region

    document = Document.parse(str(ROOT / page), blocks, mark_regions)
    found, pending, end = [], [], 0
    for example in document.examples():
        if example.parsed[0] == "mark":
            match = MARK.fullmatch(example.parsed[1])
            lines = None if not match["lines"] else {n for part in match["lines"].split(",") for n in _span(part)}
            pending.append((lines, match["reason"].strip()))
        else:
            _, language, source = example.parsed
            found.append(Block(page, example.line, language, source, pending, document.text[end:example.start]))
            pending = []
        end = example.end
    assert not pending, f"{page}: a not-run mark at its end, before no block"
    return found


def _span(part: str) -> range:
    first, _, last = part.strip().partition("-")
    return range(int(first), int(last or first) + 1)


# ---------------------------------------------------------------------------------------------------------------
# The shape of shown output.

NUMBER = r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?"


def _class_names() -> str:
    from src.inference import CLASS_NAMES

    return "|".join(re.escape(name) for names in CLASS_NAMES.values() for name in names if not name.isdigit())


def line_pattern(shown: str) -> re.Pattern:
    """A printed line of the same shape as the page's `shown`: its words and signs as they are; any number for a
    number (dates, times, figures, a run folder's name); any path for an absolute path; anything for `...`; any
    class name in parentheses for one; a bar of any length for a progress bar."""
    tokens = re.compile(rf"(?P<ellipsis>\.\.\.|…)|(?P<path>(?<![\w.])/[^\s'\",;()]+)|(?P<bar>[█▏▎▍▌▋▊▉]+ *)"
                        rf"|(?P<name>\((?:{_class_names()})\))|(?P<number>{NUMBER})")
    standing = {"ellipsis": ".*?", "path": r"\S+?", "bar": "[█▏▎▍▌▋▊▉ ]*", "name": r"\([^)]+\)", "number": NUMBER}
    parts, at = [], 0
    for match in tokens.finditer(shown.rstrip()):
        parts += [re.escape(shown[at:match.start()]), standing[match.lastgroup]]
        at = match.end()
    parts.append(re.escape(shown.rstrip()[at:]))
    return re.compile("".join(parts))


def screen(printed: str) -> list[str]:
    """The lines as a terminal leaves them: of a line redrawn after carriage returns, its last drawing."""
    return [line.split("\r")[-1].rstrip() for line in printed.replace("\r\n", "\n").split("\n")]


def shape_differs(shown: str, printed: str) -> str | None:
    """None if every line the page shows is printed, in the same order, each of the same shape (line_pattern),
    with any other printed lines in between; else which shown line is missing, and after what."""
    lines, at = screen(printed), 0
    for wanted in shown.strip("\n").splitlines():
        if not wanted.strip() or wanted.strip() in ("...", "…"):
            continue
        pattern = line_pattern(wanted)
        for i in range(at, len(lines)):
            if pattern.fullmatch(lines[i]):
                at = i + 1
                break
        else:
            after = f"after the printed line {lines[at - 1]!r}" if at else "anywhere"
            return f"the page's line {wanted.strip()!r} has no printed line of its shape {after}"
    return None


def last_line(printed: str) -> str:
    return next((line for line in reversed(screen(printed)) if line.strip()), "")


# ---------------------------------------------------------------------------------------------------------------
# Steps: what a page's blocks ask for, in order.

@dataclass
class Step:
    block: Block
    kind: str  # "command", "python", "output" (of the step before), "marked"
    text: str  # the command line, the python source, or the shown output
    line: int = 1  # in the block
    shown: str | None = None  # for a command: the output the page shows for it
    reason: str | None = None  # for "marked"


def block_steps(block: Block, previous: list[Step]) -> list[Step]:
    """The steps of one block; a ```text block right after a command is that command's shown output."""
    if block.marked() is not None:
        return [Step(block, "marked", block.source, reason=block.marked())]
    if block.language == "bash":
        steps = []
        for number, text in _command_lines(block.source):
            reason = block.marked(number)
            steps.append(Step(block, "marked", text, number, reason=reason) if reason else
                         Step(block, "command", text, number))
        return steps
    if block.language == "console":
        return _console_steps(block)
    if block.language == "python":
        return [Step(block, "python", block.source)]
    if block.language == "text" and previous and _right_after(block, previous[-1]):
        command = previous[-1]
        if command.kind == "marked":
            return [Step(block, "marked", block.source, reason=f"the output of a command not run here: {command.reason}")]
        command.shown = block.source
        return [Step(block, "output", block.source)]
    raise AssertionError(f"{block.where}: a ```{block.language} block that is neither run nor marked: run it "
                         "(bash, console, python, or text right after the command it shows) or mark it "
                         "<!-- not-run: REASON -->")


def _console_steps(block: Block) -> list[Step]:
    """A ```console block: `$ ` lines are commands (continued onto the next line after a \\), the lines under
    one are what it printed."""
    steps, lines, number = [], block.source.splitlines(), 0
    while number < len(lines):
        line, number = lines[number], number + 1
        if line.startswith("$ "):
            start, text = number, line[2:]
            while text.rstrip().endswith("\\") and number < len(lines):
                text, number = text.rstrip()[:-1] + " " + lines[number].strip(), number + 1
            reason = block.marked(start)
            steps.append(Step(block, "marked", text.strip(), start, reason=reason) if reason else
                         Step(block, "command", text.strip(), start))
        else:
            assert steps, f"{block.where}: a console block starts with output, not a `$ ` command"
            steps[-1].shown = (steps[-1].shown or "") + line + "\n"
    return steps


def _right_after(block: Block, step: Step) -> bool:
    """A shown output follows its command's block, with at most a few lines of the page's words between."""
    words = [line for line in block.before.splitlines() if line.strip()]
    return step.block.language == "bash" and step.block is not block and len(words) <= 3 \
        and not any(line.startswith("#") for line in words)


def _command_lines(source: str):
    """(line number in the block, the command) for each command, a line ending in \\ joined with the next."""
    number, pending, start = 0, "", 1
    for number, line in enumerate(source.splitlines(), 1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text and not text.startswith("#"):
            yield start, text


def page_steps(page: str) -> list[Step]:
    steps: list[Step] = []
    for block in page_blocks(page):
        steps += block_steps(block, steps)
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Running the steps.

@dataclass
class Outcome:
    code: int
    printed: str


@dataclass
class Server:
    process: subprocess.Popen
    log: Path
    url: str
    port: int


def furnish(folder: Path, shared: Path) -> Path:
    """A page's folder: data/ (MNIST/ and FashionMNIST/ of the shared data), data-val/, idx-files/, the picture
    the pages classify (my_digit.png) and the notebook they open."""
    folder.mkdir(parents=True)
    (folder / "data").mkdir()
    for dataset in ("MNIST", "FashionMNIST"):
        (folder / "data" / dataset).symlink_to(shared / "data" / dataset)
    for name in ("data-val", "idx-files"):
        (folder / name).symlink_to(shared / name)
    (folder / "my_digit.png").write_bytes((ROOT / "docs" / "my_digit.png").read_bytes())
    (folder / "notebooks").mkdir()
    (folder / "notebooks" / "walkthrough.ipynb").write_bytes((ROOT / "notebooks" / "walkthrough.ipynb").read_bytes())
    return folder


class PageRun:
    """A page's folder, its servers, the Python namespace of its python blocks."""

    def __init__(self, page: str, folder: Path, shared: Path, session: dict):
        self.page, self.cwd, self.session = page, folder, session
        self.namespace: dict = {"__name__": "__main__"}
        self.servers: list[Server] = []
        self.early: dict[str, Server] = {}  # the servers started, by their command
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.background: list = []  # (step, command, shown output, future of its Outcome)
        self.ports: dict[int, int] = {}  # the page's port -> the one used
        self.shared, self.started = shared, set()  # the steps started with the page (start_early)
        furnish(folder, shared)

    # --- the command line as run here
    def resolve(self, text: str) -> str:
        for pattern, standing, _ in PLACEHOLDERS:
            text = re.sub(pattern, lambda _: self._stand_in(standing), text)
        return text

    def _stand_in(self, standing: str) -> str:
        kind, _, what = standing.partition(":")
        if kind == "FIRST":  # outputs/DATE/TIME/ sorts as it was made
            found = sorted(self.cwd.glob(f"outputs/*-*-*/*/checkpoints/{what}"))
            assert found, f"{self.page}: no {what} under outputs/ for the page's placeholder"
            return str(found[0].relative_to(self.cwd))
        if kind == "SERVED":
            assert int(what) in self.ports, f"{self.page}: no server was started for port {what}"
            return f"http://127.0.0.1:{self.ports[int(what)]}"
        return standing

    def added(self, words: list[str]) -> list[str]:
        typed = shlex.join(words)  # as the page writes it
        words = [self.resolve(word) for word in words]
        for pattern, added, _ in ADDED:
            if re.search(pattern, typed):
                for word in added:
                    if "FREE" in word:
                        documented = _documented_port(typed)
                        self.ports[documented] = self.ports.get(documented) or free_port()
                        word = word.replace("FREE", str(self.ports[documented]))
                    words = _with(words, word)
        return words

    # --- running
    def command(self, step: Step) -> str | None:
        """Run the step's command line; None when done, else why it failed."""
        for pattern, can, why in ONLY_WHERE:
            if re.search(pattern, step.text) and not can():
                return f"SKIPPED: {why}"
        if (step.block.line, step.line) in self.started:
            return None  # running since the page started; judged when it ends
        parts, ran, same = typed_commands(step.text), self.session.setdefault("ran", {}), []
        for number, typed in enumerate(parts):
            shown = step.shown if number == len(parts) - 1 else None
            command = shlex.join(typed)
            if self.page == FRONT_PAGE and shown is None and command in ran:
                same.append(ran[command])
                continue
            failure = self.one(step, self.added(typed), shown)
            if failure:
                return failure
            ran.setdefault(command, step.block.where)
        return f"SAME: {', '.join(same)}" if len(same) == len(parts) else None

    def one(self, step: Step, words: list[str], shown: str | None) -> str | None:
        env, words, into = environment_and_redirect(words)
        text, how = shlex.join(words), runner(words)
        if how is None:
            return f"no way to run `{text}` here: mark it <!-- not-run: lines {step.line}: REASON -->"
        if how == "pip":
            return self.pip_install(words[3])
        if how == "server":
            return self.serve(step, words, env)
        if how == "processes" and not into:
            return self.in_background(step, text, [sys.executable, *words[1:]], env, shown)
        if how == "processes":
            outcome = self.subprocess([sys.executable, *words[1:]], entry_env(**env))
        elif how == "exec":
            outcome = exec_in_process(words[2], self.cwd, env)
        else:
            outcome = run_in_process(words[2], words[3:], self.cwd, env)
        if into:
            (self.cwd / into).write_text(outcome.printed)
        return judge(text, outcome, shown)

    def pip_install(self, spec: str) -> str | None:
        """`pip install -e .` or `-e ".[EXTRA]"`: what it installs is installed (src/extras.py's check)."""
        from src.extras import not_installed

        match = re.fullmatch(r"\.(?:\[(\w+)\])?", spec)
        if not match:
            return f"pip install -e {spec}: not the project or one of its extras"
        missing = not_installed(match[1])
        needs(not missing, f"the page needs what `pip install -e {spec}` installs: {', '.join(missing)}")
        return None

    def subprocess(self, argv: list[str], env: dict, cwd: Path | None = None) -> Outcome:
        done = subprocess.run(argv, cwd=cwd or self.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=600)
        return Outcome(done.returncode, done.stdout)

    def in_background(self, step: Step, text: str, argv: list[str], env: dict, shown: str | None,
                      cwd: Path | None = None) -> None:
        """A command of processes of its own, run while the page goes on (one such at a time, the next
        started when it ends), so that they use the second core; judged when the page ends (done())."""
        env = entry_env(**env)  # now: the page's own runs change os.environ
        self.background.append((step, text, shown, self.pool.submit(self.subprocess, argv, env, cwd)))

    def done(self) -> list[str]:
        """Wait for the commands run in the background; what failed, each with its place."""
        failed = []
        for step, text, shown, future in self.background:
            failure = judge(text, future.result(), shown)
            if failure:
                failed.append(f"{step.block.where} (line {step.line} of the block): {failure}")
        self.background.clear()
        return failed

    def start_early(self, steps: list[Step]) -> None:
        """Start, with the page, what does not depend on what its commands before write, so that it runs while
        they do: the commands of processes of their own that show no output (in folders of their own, judged
        when the page ends), and the servers of EARLY_SERVER (each waited for when its block comes)."""
        for step in steps:
            if step.kind != "command":
                continue
            [*_, last] = parts = typed_commands(step.text)
            if len(parts) == 1 and step.shown is None and runner(last) == "processes":
                # Writes its own run folder and reads nothing of the page's: started now, in a folder of its own
                # (beside the page's, so that its run folder cannot be taken for one of the page's commands').
                words = self.added(last)
                apart = furnish(self.cwd.with_name(f"{self.cwd.name}-{step.block.line}-{step.line}"), self.shared)
                self.in_background(step, shlex.join(words), [sys.executable, *words[1:]], {}, None, apart)
                self.started.add((step.block.line, step.line))
                continue
            for words in typed_commands(step.text):
                if EARLY_SERVER.match(shlex.join(words)) and not re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    self.start(step, self.added(words), {})

    def start(self, step: Step, words: list[str], env: dict) -> Server | None:
        """The server of `words`, started now, or the one started for them before (None: served already in
        this session, from the same repository)."""
        text = shlex.join(words)
        if text in self.early:
            return self.early[text]
        once, served = SESSION_SERVER.match(text), self.session.setdefault("served", {})
        if once:
            if once[0] in served:
                return None
            served[once[0]] = step.block.where
        argv = [sys.executable, *words[1:]] if words[0] == "python" else [str(Path(sys.executable).parent / words[0]),
                                                                          *words[1:]]
        log = self.cwd / f"server-{len(self.servers)}.log"
        extra = {"JUPYTER_RUNTIME_DIR": str(self.cwd / ".jupyter"), "JUPYTER_CONFIG_DIR": str(self.cwd / ".jupyter")}
        with log.open("w") as out:
            process = subprocess.Popen(argv, cwd=ROOT if once else self.cwd, env=entry_env(**env, **extra),
                                       stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        port = next(int(re.split(r"[=:]", w)[-1]) for w in words if re.search(r"port=\d+$|:\d+$", w))
        server = self.early[text] = Server(process, log, "", port)
        self.servers.append(server)
        return server

    def serve(self, step: Step, words: list[str], env: dict) -> str | None:
        """Start a server (or take the one started early), wait for its own word that it serves: the URL it
        prints, then a page from that URL."""
        server = self.start(step, words, env)
        if server is None:  # served already in this session, from the same repository
            return f"SAME: {self.session['served'][SESSION_SERVER.match(shlex.join(words))[0]]}"
        server.url = wait_until_served(server)
        return None

    def python(self, step: Step) -> str | None:
        source = self.resolve(step.text)
        printed = io.StringIO()
        with in_folder(self.cwd), contextlib.redirect_stdout(printed):
            try:
                exec(compile(source, step.block.where, "exec"), self.namespace)
            except Exception:  # noqa: BLE001 - the page's code failed: say how
                return f"the python block failed:\n{traceback.format_exc()[-3000:]}"
        return None

    def close(self) -> None:
        """Stop the servers by their pids, as Ctrl-C does (a server that outlives it, and what it started, is
        killed as its process group), and let the background commands end."""
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGINT)
                try:
                    server.process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.process.pid, signal.SIGKILL)
                    server.process.wait(30)
        self.pool.shutdown(wait=True)


def environment_and_redirect(words: list[str]) -> tuple[dict, list[str], str | None]:
    """`NAME=value ... COMMAND ... > FILE 2>&1` as (the environment it sets, the command, FILE or None)."""
    env, words = {}, list(words)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    into = None
    if words[-1:] == ["2>&1"]:
        words = words[:-1]
    if len(words) > 2 and words[-2] == ">":
        into, words = words[-1], words[:-2]
    return env, words, into


def runner(words: list[str]) -> str | None:
    """How a command of the pages runs here: "pip" (checked, not run), "server", "processes" (of its own),
    "in-process" (python -m src.X), "exec" (python -c), or None: it cannot, and must be marked."""
    text = shlex.join(words)
    if words[:3] == ["pip", "install", "-e"] and len(words) == 4:
        return "pip"
    if SERVER.match(text):
        return "server"
    if words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith("src."):
        return "processes" if OWN_PROCESS.search(text) else "in-process"
    if words[:2] == ["python", "-c"] and len(words) == 3:
        return "exec"
    return None


def typed_commands(text: str) -> list[list[str]]:
    """A command line's commands, as the page writes them: split at `&&`, without the comment."""
    parts: list[list[str]] = [[]]
    for word in shlex.split(text, comments=True):
        if word == "&&":
            parts.append([])
        else:
            parts[-1].append(word)
    return parts


def _documented_port(text: str) -> int:
    """The port the page means: its port=N (or --port N), else the server's default."""
    given = re.search(r"port[= ](\d+)", text)
    if given:
        return int(given[1])
    defaults = {"python -m src.app": 7860, "python -m mkdocs serve": 8000, "jupyter notebook": 8888,
                "tensorboard": 6006}
    return next(port for start, port in defaults.items() if text.startswith(start))


def _with(words: list[str], word: str) -> list[str]:
    """`words` with `word` added: a key=value (Hydra's override, --flag=value) replaces the same key's."""
    key = re.match(r"^[+~]*([^=]+)=", word)
    if key:
        for i, old in enumerate(words):
            if re.match(rf"^[+~]*{re.escape(key[1])}=", old):
                return [*words[:i], word, *words[i + 1:]]
    return [*words, word]


def judge(text: str, outcome: Outcome, shown: str | None) -> str | None:
    """An example that shows an error ends with it and a non-zero status; the others exit 0; shown output keeps
    its shape."""
    tail = "\n".join(screen(outcome.printed)[-40:])
    shows_error = shown is not None and re.search(r"^(error: |Traceback \(most recent call last\):)", shown, re.M)
    if shows_error:
        if outcome.code == 0:
            return f"`{text}` exited 0, but the page shows it failing:\n{tail}"
        wanted = last_line(shown)
        if not line_pattern(wanted).fullmatch(last_line(outcome.printed)):
            return f"`{text}` ended with\n  {last_line(outcome.printed)}\nnot with the page's\n  {wanted}"
    elif outcome.code != 0:
        return f"`{text}` exited {outcome.code}:\n{tail}"
    if shown is not None:
        differs = shape_differs(shown, outcome.printed)
        if differs:
            return f"the output of `{text}` is no longer the page's shape: {differs}; it printed:\n{tail}"
    return None


@contextlib.contextmanager
def in_folder(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def as_a_new_process(env: dict, printed: io.StringIO):
    """What a `python ...` process would start with: its environment (`env` added, no HYDRA_FULL_ERROR unless
    given), Python's own warning filters (each warning shown once per command, to its stderr), a fresh Hydra."""
    from hydra.core.global_hydra import GlobalHydra

    saved_env, saved_handlers, saved_level = dict(os.environ), logging.root.handlers[:], logging.root.level
    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ.update(env)
    GlobalHydra.instance().clear()

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = show
            yield
    finally:
        for handler in logging.root.handlers:  # Hydra's, for the console and train.log
            if handler not in saved_handlers:
                handler.close()
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(saved_env)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): printed, status 1
    return 1


def run_in_process(module: str, args: list[str], cwd: Path, env: dict) -> Outcome:
    """`python -m MODULE ARGS` in this process: sys.argv set, its SystemExit caught, an uncaught exception printed
    with its traceback (status 1), as Python does."""
    printed = io.StringIO()
    saved_argv = sys.argv
    with in_folder(cwd), as_a_new_process(env, printed):
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = _exit_code(stop.code)
        except Exception:  # noqa: BLE001 - what Python prints for an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = saved_argv
    return Outcome(code, printed.getvalue())


def exec_in_process(code: str, cwd: Path, env: dict) -> Outcome:
    """`python -c CODE` in this process."""
    printed = io.StringIO()
    with in_folder(cwd), as_a_new_process(env, printed):
        try:
            exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
            status = 0
        except SystemExit as stop:
            status = _exit_code(stop.code)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            status = 1
    return Outcome(status, printed.getvalue())


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_served(server: Server, timeout: float = 300) -> str:
    """The URL the server prints once it serves on its port, after it has answered a request for it."""
    port = server.port
    deadline = time.time() + timeout
    url = None
    while time.time() < deadline:
        printed = server.log.read_text(errors="replace")
        assert server.process.poll() is None, f"the server stopped with status {server.process.returncode}:\n" \
                                              f"{printed[-3000:]}"
        found = re.search(rf"https?://(?:127\.0\.0\.1|localhost|0\.0\.0\.0):{port}[^\s)]*", printed)
        if found:
            url = found[0].replace("localhost", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
            if answers(url):
                return url
        time.sleep(0.2)
    raise AssertionError(f"not served on port {port} within {timeout} s (url {url}):\n{server.log.read_text()[-3000:]}")


# ---------------------------------------------------------------------------------------------------------------
# The tests.

VERDICTS: dict[str, dict] = {}  # page -> {block line: [("ran", text) | ("marked", reason)]}
TIMES: list[tuple[float, str, str]] = []  # (seconds, where, command) of each step run


@pytest.fixture(scope="session")
def docs_workspace(tmp_path_factory) -> Path:
    """The pages' data, written once: data/MNIST/raw and data/FashionMNIST/raw, torchvision's layout, with 600
    training and 200 test images; data-val/, with 10,600 training images, for the pages that hold 10,000 out;
    idx-files/, the four files in one folder, as a user who has them would. A tenth of each test split is
    labelled one class off, so that a model gets some test images wrong, as the pages' models do (evaluate's
    gallery of mistakes)."""
    from src.offline_digits import read_idx, write_idx

    root = tmp_path_factory.mktemp("docs")
    folders = [write_dataset(root / folder / dataset / "raw", n_train=n_train, gz=False)
               for folder, n_train in (("data", 600), ("data-val", 10_600)) for dataset in ("MNIST", "FashionMNIST")]
    folders.append(write_dataset(root / "idx-files"))
    for folder in folders:
        [labels] = folder.glob("t10k-labels-idx1-ubyte*")
        wrong = read_idx(labels).copy()
        wrong[::10] = (wrong[::10] + 1) % 10
        write_idx(labels, wrong)
    return root


@pytest.fixture(scope="session")
def session_servers() -> dict:
    return {}


def test_every_block_is_run_or_marked():
    """Each page's blocks, read as the page tests read them: a block that is neither a runnable one nor marked
    fails here, with its line."""
    for page in PAGES:
        for step in page_steps(page):
            if step.kind == "marked":
                assert step.reason and len(step.reason) > 10, f"{step.block.where}: a mark needs its reason"
            if step.kind == "command":
                for words in typed_commands(step.text):
                    assert runner(environment_and_redirect(words)[1]), \
                        f"{step.block.where}, line {step.line} of the block: no way to run `{shlex.join(words)}` " \
                        f"here: mark it <!-- not-run: lines {step.line}: REASON -->"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_examples(page, docs_workspace, session_servers, tmp_path):
    steps = page_steps(page)
    verdicts = VERDICTS.setdefault(page, {})
    run = PageRun(page, tmp_path / Path(page).stem, docs_workspace, session_servers)
    run.start_early(steps)
    try:
        for text in PRELUDES.get(page, []):
            prelude = Step(Block(page, 0, "bash", text), "command", text)
            failure = run.command(prelude)
            assert failure is None, f"{page}: its prelude `{text}`: {failure}"
        for step in steps:
            record = verdicts.setdefault(step.block.line, [])
            if step.kind == "marked":
                record.append(("marked", step.reason))
                continue
            if step.kind == "output":
                record.append(("ran", "compared"))
                continue
            began = time.perf_counter()
            failure = run.command(step) if step.kind == "command" else run.python(step)
            if failure and failure.startswith("SKIPPED: "):
                record.append(("marked", failure.removeprefix("SKIPPED: ")))
                continue
            if failure and failure.startswith("SAME: "):
                record.append(("ran", f"the same command ran at {failure.removeprefix('SAME: ')} in this session"))
                continue
            assert failure is None, f"{step.block.where} (line {step.line} of the block): {failure}"
            record.append(("ran", step.text))
            TIMES.append((time.perf_counter() - began, f"{step.block.where}+{step.line - 1}", step.text[:90]))
        failed = run.done()
        assert not failed, "\n".join(failed)
    finally:
        run.close()


def test_summary(record_property, request):
    """How many blocks ran and how many are marked, by reason; and that every block of the pages run got one.
    Printed at the end of the session (tests/conftest.py's pytest_terminal_summary), from whichever worker ran it:
    the one that ran the pages before it (pytest-xdist's --dist loadfile)."""
    if not VERDICTS:
        pages_selected = any(getattr(item, "originalname", None) == "test_page_examples" for item in request.session.items)
        assert not pages_selected, "the pages' tests ran in another worker than this one (see --dist in pyproject.toml)"
        pytest.skip("no page was run in this session (tests/test_docs_examples.py::test_page_examples)")
    blocks, reasons, missing = Counter(), Counter(), []
    for page, verdicts in VERDICTS.items():
        for block in page_blocks(page):
            kinds = {kind for kind, _ in verdicts.get(block.line, [])}
            if not kinds:
                missing.append(block.where)
            blocks["ran" if "ran" in kinds else "marked" if kinds else "neither"] += 1
            reasons.update(reason for kind, reason in verdicts.get(block.line, []) if kind == "marked")
    lines = [f"docs examples: {len(VERDICTS)} pages, {blocks['ran']} blocks run, {blocks['marked']} marked "
             "not runnable here; the marked blocks and lines by reason:"]
    lines += [f"  {count:3d}  {reason}" for reason, count in reasons.most_common()]
    lines.append(f"the slowest of {len(TIMES)} steps run ({sum(t for t, _, _ in TIMES):.1f} s in all):")
    lines += [f"  {seconds:6.1f} s  {where}  {text}" for seconds, where, text in sorted(TIMES, reverse=True)[:12]]
    record_property(SUMMARY, "\n".join(lines))
    assert not missing, f"blocks neither run nor marked: {missing}"
