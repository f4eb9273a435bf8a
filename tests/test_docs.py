"""The README and the docs/ pages stay true to the code: every command they show parses with the script's own parser
(train.py's flags against the model's Config and preset), and every relative link points at a file (and heading) that
exists. A renamed flag, a removed preset or a moved page fails here, naming the page and the line."""
import argparse
import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = ("train.py", "eval.py", "bench.py", "convert.py", "prepare.py")
FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
SHELL_BLOCKS = ("bash", "sh", "shell", "console", "")
SEPARATORS = {";", "&&", "||", "|", "&"}


# ----------------------------------------------------------------------------------------------------------------------
# Commands: fenced shell blocks line by line (with `\` continuations), and inline `python X.py ...` code spans
# ----------------------------------------------------------------------------------------------------------------------
def shell_commands(line):
    """The argv lists of one shell line: split at ; && || |, comments dropped, leading VAR=value dropped, and a
    `for V in a b; do CMD; done` loop expanded into one CMD per value."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    loop, out = None, []
    for argv in filter(None, commands):
        if argv[0] == "for" and len(argv) >= 3 and argv[2] == "in":
            loop = (argv[1], argv[3:])
            continue
        if argv[0] == "do":
            argv = argv[1:]
        if argv == ["done"]:
            loop = None
            continue
        while argv and re.fullmatch(r"\w+=\S*", argv[0]):
            argv = argv[1:]
        if loop is None:
            out.append(argv)
        else:
            name, values = loop
            out += [[re.sub(rf"\$\{{?{name}\}}?", value, a) for a in argv] for value in values]
    return out


def script_argv(argv):
    """(script, its arguments) for `python X.py ...` and `torchrun [opts] X.py ...`; None for any other command."""
    if len(argv) >= 2 and argv[0] in ("python", "python3") and argv[1] in SCRIPTS:
        return argv[1], argv[2:]
    if argv and argv[0] == "torchrun":
        scripts = [i for i, a in enumerate(argv) if a in SCRIPTS]
        if scripts:
            return argv[scripts[0]], argv[scripts[0] + 1:]
    return None


def page_commands(path, root=REPO):
    """[(where, script, args)] of every script command on a page."""
    text = path.read_text()
    name = path.relative_to(root).as_posix()
    found = []

    def add(line, lineno):
        if not re.search(r"\b(" + "|".join(re.escape(s) for s in SCRIPTS) + r")\b", line):
            return
        for argv in shell_commands(line):
            parsed = script_argv(argv)
            if parsed and "..." not in parsed[1]:  # `python train.py ...`: any command, a placeholder
                found.append((f"{name}:{lineno}", *parsed))

    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL_BLOCKS:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", None
        for i, line in enumerate(block.group(2).split("\n")):
            start = first + i if start is None else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            add(pending + line, start)
            pending, start = "", None
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
    for span in re.finditer(r"`([^`]+)`", prose):
        command = " ".join(span.group(1).split())
        if re.match(r"(\w+=\S+ )*(python3? |torchrun )", command):
            add(command, prose.count("\n", 0, span.start()) + 1)
    return found


class Parsed(BaseException):
    """Raised where a script, its command line parsed and checked, would start working (a BaseException, so that no
    `except Exception` of the script swallows it)."""


def stop(*args, **kwargs):
    raise Parsed()


def check_command(script, args, monkeypatch):
    """Parse `script args` with the script's own parser, run nothing; returns the parser's error text, or None."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if script == "train.py":
                import train
                parsed, module, overrides = train.parse_args(args)
                dataclasses.replace(module.PRESETS[parsed.preset], **overrides)
            else:
                module = __import__(script[:-3])
                if script == "eval.py":  # its own checks after parse_args (--vocab needs --image, ...) run too
                    import checkpoint
                    monkeypatch.setattr(checkpoint, "load_checkpoint", stop)
                else:
                    real = argparse.ArgumentParser.parse_args

                    def parse_then_stop(self, args=None, namespace=None):
                        real(self, args, namespace)  # exits with the parser's error on a wrong command line
                        stop()
                    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
                module.main(args)
                return "the script ran past its argument parsing (the test expected to stop there)"
    except Parsed:
        return None
    except SystemExit as e:
        if e.code in (0, None) and ("--help" in args or "-h" in args):
            return None
        return err.getvalue().strip() or f"exit status {e.code}"
    except (TypeError, ValueError) as e:  # a Config that rejects the overrides
        return f"{type(e).__name__}: {e}"
    finally:
        monkeypatch.undo()
    return None


COMMANDS = [c for page in PAGES for c in page_commands(page)]


@pytest.mark.parametrize("where,script,args", COMMANDS, ids=[f"{w} {s}" for w, s, _ in COMMANDS])
def test_every_command_in_the_docs_parses(where, script, args, monkeypatch):
    error = check_command(script, args, monkeypatch)
    assert error is None, f"{where}: python {script} {shlex.join(args)}\n{error}"


def test_the_commands_are_found_on_every_page():
    """The extractor sees the commands it must check: every paper page has its train.py commands, the README its
    set-up line, and the shapes of shell lines (continuations, &&, comments, for loops) come apart as a shell would."""
    pages = {w.split(":")[0] for w, _, _ in COMMANDS}
    for paper in ("san", "zsseg", "ann", "pose_transfer", "soft_teacher", "mixtraining"):
        assert any(w.startswith(f"docs/{paper}.md:") and s == "train.py" for w, s, _ in COMMANDS), paper
    assert "README.md" in pages and len(COMMANDS) > 60
    assert ("README.md:11", "train.py", ["--model", "san"]) in COMMANDS  # after `pip install ... &&`, comment dropped
    assert shell_commands("for b in a c; do python train.py --block $b --out runs/x_$b; done  # two runs") == [
        ["python", "train.py", "--block", "a", "--out", "runs/x_a"],
        ["python", "train.py", "--block", "c", "--out", "runs/x_c"]]
    assert shell_commands("OMP_NUM_THREADS=1 python bench.py --model ann && echo '#1; done'") == [
        ["python", "bench.py", "--model", "ann"], ["echo", "#1; done"]]


def test_a_wrong_flag_or_preset_fails(monkeypatch, tmp_path):
    """The check is real: a renamed flag, a preset that does not exist, a bad value, a misspelt script option and a
    `\\` continuation hiding a wrong flag are all caught."""
    assert check_command("train.py", ["--model", "ann", "--context", "apnb"], monkeypatch) is None
    assert "unrecognized arguments: --contxt" in check_command("train.py", ["--model", "ann", "--contxt", "apnb"],
                                                                 monkeypatch)
    assert "no preset 'paper_xl'" in check_command("train.py", ["--model", "san", "--preset", "paper_xl"], monkeypatch)
    assert "expected true or false" in check_command("train.py", ["--model", "soft_teacher", "--soft_weights", "maybe"],
                                                      monkeypatch)
    assert "unrecognized arguments: --toy_table" in check_command("bench.py", ["--model", "ann", "--toy_table", "r"],
                                                                  monkeypatch)
    assert "--vocab names the classes for --image" in check_command("eval.py", ["--ckpt", "c.pt", "--vocab", "a,b"],
                                                                    monkeypatch)
    assert "invalid choice" in check_command("prepare.py", ["coco_stuf_171", "--raw", "d"], monkeypatch)
    assert check_command("convert.py", ["san", "a.pth", "b.pt", "--force"], monkeypatch) is None
    page = tmp_path / "page.md"
    page.write_text("```bash\npython train.py --model zsseg \\\n    --preset paper_cocoo  # wrong\n```\n")
    [(where, script, args)] = page_commands(page, root=tmp_path)
    assert where == "page.md:2" and "no preset 'paper_cocoo'" in check_command(script, args, monkeypatch)


# ----------------------------------------------------------------------------------------------------------------------
# Links: every relative [text](path) and [text](path#anchor) resolves; anchors are GitHub's heading slugs
# ----------------------------------------------------------------------------------------------------------------------
def slugs(path):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces -> '-', repeats -1, -2."""
    text = FENCE.sub("", path.read_text())
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def page_links(path):
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


LINKS = [(page, link) for page in PAGES for link in page_links(page)
         if not re.match(r"[a-z]+:", link)]  # http:, https:, mailto: are not checked (no network)


@pytest.mark.parametrize("page,link", LINKS, ids=[f"{p.name} -> {l}" for p, l in LINKS])
def test_every_relative_link_resolves(page, link):
    target, _, anchor = link.partition("#")
    file = (page.parent / target).resolve() if target else page
    assert file.exists(), f"{page.relative_to(REPO)}: link to {link}: no such file"
    if anchor and file.suffix == ".md":
        assert anchor in slugs(file), f"{page.relative_to(REPO)}: link to {link}: no heading with that anchor " \
                                      f"(anchors there: {', '.join(sorted(slugs(file)))})"


def test_the_links_are_found():
    assert len(LINKS) > 40
    assert {p.name for p, _ in LINKS} >= {"README.md", "san.md", "zsseg.md", "ann.md", "pose_transfer.md",
                                          "soft_teacher.md", "mixtraining.md", "training.md", "datasets.md"}
    assert "san-side-adapter-network-sanpy" in slugs(REPO / "docs" / "san.md")
