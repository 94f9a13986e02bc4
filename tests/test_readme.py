"""The README against the paper and the code: its commands use the paper's settings, and its
"Notes and deviations" table names every choice a reader comparing code and paper trips over."""
import argparse
import io
import re
import shlex
from contextlib import redirect_stderr
from pathlib import Path
from unittest import mock

import condense
import datasets
import glow
import per_instance
import posthoc

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# the JPEG qualities of the authors' Fig. S4 runs
AUTHORS_JPEG_QUALITIES = {0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20, 30, 40, 60, 80, 100}


def deviations_table():
    section = README.split("## Notes and deviations", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


def test_the_s4_commands_use_only_the_authors_jpeg_qualities():
    grids = re.findall(r"--jpeg-quality ([\d,]+)", README)
    assert grids, "the README shows no --jpeg-quality command"
    for grid in grids:
        assert {int(q) for q in grid.split(",")} <= AUTHORS_JPEG_QUALITIES, grid


def test_the_deviations_table_names_each_choice_of_the_code():
    rows = deviations_table()

    def row(topic):
        found = [r for r in rows if topic in r.split("|")[1]]
        assert found, f"no deviations row about {topic!r}"
        return found[0]
    assert "max(0, 1 − l_i(f'(x_orig))/0.1)" in row("switch L_sim off")
    simplifier, classifier = row("optimizers").split("classifier:", 1)
    assert all(k in simplifier for k in ("Adam,", "betas (0.5, 0.99)", "coupled L2", "5e-5"))
    assert all(k in classifier for k in ("AdamW", "betas (0.9, 0.995)", "1e-5",
                                         "weights and gains"))
    assert "AdamW with weight decay 1e-5" in row("optimizers")  # what the paper says
    assert "own dropout mask" in row("dropout") and "CUDA" in row("dropout")
    quick = row("`--quick` presets")
    assert all(k in quick for k in ("DC ConvNet instead of the NF-WideResNet", "λ = 50",
                                    "lr 5e-3"))
    assert "std floored at 0.1" in row("normalisation")


def test_every_picture_the_readme_shows_is_a_small_png_in_assets():
    """Each image the README links lies in assets/, is a PNG under 150 KB, and assets/ holds
    nothing else (the pictures are made by the commands the README shows beside them)."""
    root = Path(__file__).resolve().parent.parent
    linked = re.findall(r"!\[[^\]]*\]\((assets/[^)\s]+)\)", README)
    assert len(linked) >= 7, linked  # one per mode and figure of the README's pictures
    for link in linked:
        path = root / link
        assert path.is_file(), link
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
        assert path.stat().st_size < 150_000, link
    assert sorted(p.name for p in (root / "assets").iterdir()) == sorted(
        Path(link).name for link in set(linked))


def test_the_readme_stays_within_its_line_budget():
    assert len(README.splitlines()) <= 310


# --- the README's commands against the scripts' own argument parsers (nothing runs) ---------

BENCHMARK = (ROOT / "tests" / "benchmark.py").read_text()  # its parser is built under __main__
# flags of the other programs the README shows: pytest, pip, torchrun; sbatch's #SBATCH lines
OTHER_FLAGS = {"-q", "-r", "--nproc_per_node", "--standalone", "--nnodes", "--node_rank",
               "--rdzv_backend", "--rdzv_endpoint", *re.findall(r"#SBATCH (--[\w-]+)", README)}


# each script's own parsing and checks of its flags; none of them starts, writes or downloads
PARSE = {"per_instance.py": per_instance.get_args, "condense.py": condense.get_args,
         "posthoc.py": posthoc.get_args, "glow.py": glow.get_args,
         "datasets.py": datasets.get_args}


def parse(script, argv):
    """(the parser that read argv, for glow.py its sub-command's; argparse's error or None)."""
    error, parse_args = None, argparse.ArgumentParser.parse_args
    with mock.patch.object(argparse.ArgumentParser, "parse_args", autospec=True,
                           side_effect=parse_args) as calls, redirect_stderr(io.StringIO()) as err:
        try:
            PARSE[script](list(argv))
        except SystemExit:
            error = err.getvalue().strip().splitlines()[-1]
    parser = calls.call_args_list[0].args[0]  # the script's (top-level) parser
    subs = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return (subs[0][argv[0]] if subs and argv and argv[0] in subs[0] else parser), error


def flags(argv):
    """The --flags of a command line, `[--device cuda]` of a usage line included."""
    return [t.lstrip("[").split("=")[0].rstrip("]") for t in argv if t.lstrip("[")[:2] == "--"]


def script_commands(shell):
    """(script, argv) of each `python X.py ...` in a piece of shell, and of each
    `torchrun ... X.py ...` from X.py on; each ends at a shell operator or comment."""
    pattern = r"(?<!\S)(?:python|torchrun\s.*?)\s+((?:tests/)?\w+\.py)(?!\S)(.*)"
    return [(m[1], tuple(shlex.split(m[2], comments=True)))
            for part in re.split(r"&&|\|\||;", shell) if (m := re.search(pattern, part, re.S))]


def readme_commands():
    """Every (script, argv) the README names: in its ```bash blocks (continued lines joined,
    comments skipped, a `for` loop's commands once per value of its variables; an unset
    variable such as $SLURM_ARRAY_TASK_ID is 0), and in the inline code of its prose."""
    def substitute(text, env):
        return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], "0"), text)
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        loops = [[{}]]  # per open `for` loop, the values of the shell variables in each pass
        for line in (line.strip() for line in block.replace("\\\n", " ").splitlines()):
            if line.startswith("done"):
                loops.pop()
            if loop := re.fullmatch(r"for (\w+) in (.*); do", line):
                loops.append([{**env, loop[1]: value} for env in loops[-1]
                              for value in shlex.split(loop[2])])
            elif line.startswith("set -- "):  # $1, $2, ...: the words of the loop's value
                loops[-1] = [{**env, **{str(i): word for i, word in enumerate(
                    shlex.split(substitute(line[7:], env)), 1)}} for env in loops[-1]]
            elif not line.startswith("#"):
                found += [c for env in loops[-1] for c in script_commands(substitute(line, env))]
    return sorted(set(found + [c for span in inline_code() for c in script_commands(span)]))


def inline_code():
    return re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", README, flags=re.S))


def test_every_command_the_readme_names_parses():
    """Each command of a project script parses: its script's parser knows each --flag by its
    full name, the sub-command (glow.py) or benchmark names are the script's, and the mode
    scripts' get_args accept the combination. tests/benchmark.py, whose parser is built
    under __main__, is checked against its add_argument strings and BENCHMARKS instead."""
    commands = readme_commands()
    assert {script for script, _ in commands} == {*PARSE, "tests/benchmark.py"}, commands
    assert len(commands) >= 40, commands  # the loops' passes included
    problems = []
    for script, argv in commands:
        if script == "tests/benchmark.py":
            first_flag = next((i for i, t in enumerate(argv) if "--" in t), len(argv))
            unknown = [f for f in flags(argv) if f'add_argument("{f}"' not in BENCHMARK] + [
                n for n in re.findall(r"\w+", " ".join(argv[:first_flag]))
                if f'"{n}": bench_' not in BENCHMARK]
            error = None
        else:
            parser, error = parse(script, argv)
            unknown = [f for f in flags(argv) if f not in parser._option_string_actions]
        if unknown or error:
            problems.append(f"python {script} {shlex.join(argv)}\n  unknown: {unknown} {error}")
    assert not problems, "\n".join(problems)


def test_every_flag_the_prose_names_is_a_flag_of_a_script():
    """Each --flag in the prose's and tables' inline code is one of a script's (any
    sub-command's), or of pytest, pip, torchrun or the Slurm script's sbatch."""
    known = OTHER_FLAGS | set(re.findall(r'add_argument\("(--[\w-]+)"', BENCHMARK))
    for script in PARSE:
        parser, _ = parse(script, [])
        for each in [parser, *(sub for a in parser._actions  # glow.py's sub-commands
                               if isinstance(a, argparse._SubParsersAction)
                               for sub in a.choices.values())]:
            known |= set(each._option_string_actions)
    named = {flag for span in inline_code() for flag in re.findall(r"(?<![\w-])--\w[\w-]*", span)}
    assert len(named) >= 20, named
    assert named <= known, sorted(named - known)
