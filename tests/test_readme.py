"""The README against the paper and the code: its commands use the paper's settings, and its
"Notes and deviations" table names every choice a reader comparing code and paper trips over."""
import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

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
