"""The repository speaks of the product only, and its documents keep their shape: no issue numbers, no logs of
how the work went, no paths of one machine; a README for users within its length; each measured number in one
document; the defaults the documents quote are the settings' own."""

import re
import subprocess
from pathlib import Path

import pytest

from service.config import Settings
from tests.helpers import REPO

DOCUMENTS = ["README.md", "docs/architecture.md", "docs/api.md", "docs/training.md", "docs/anomaly.md",
             "docs/results.md", "bench/README.md", "deploy/README.md", "client/README.md"]
BINARY = (".png", ".ts", ".gz", ".ckpt")
# Written in pieces, so that this file does not match its own patterns.
MACHINE_PATHS = ["/" + "work/", "/root/" + ".pyenv", "/" + "home/", "../" + "shared", "/tmp/" + "bench/",
                 "/tmp/" + "pytest", "/opt/" + "pypi"]
ISSUE = re.compile(r"\b[Ii]ssues?\s*#?\s*\d+|(?<![\w&/#])#\d{1,3}\b(?![\w-])")
WORK_LOG = re.compile(r"\b(this|previous|earlier|next|last) session\b|\bwe tried\b|\b20\d\d-\d\d-\d\d\b", re.I)


def tracked() -> list:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if not f.endswith(BINARY) and (REPO / f).is_file()]


@pytest.mark.parametrize("what, pattern", [("a path of one machine", None), ("an issue number", ISSUE),
                                           ("a log of how the work went", WORK_LOG)])
def test_the_repository_speaks_of_the_product_only(what, pattern):
    found = []
    for name in tracked():
        text = (REPO / name).read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            hit = any(p in line for p in MACHINE_PATHS) if pattern is None else pattern.search(line)
            if hit and name != "tests/test_repository.py":
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, f"{what}:\n" + "\n".join(found[:20])


def words(name: str) -> list:
    return (REPO / name).read_text().split()


def test_the_readme_is_for_users():
    """At most ~1,500 words; its first 500: the two commands, a curl each for /encode, /sample and
    /anomaly-score, and where the page is."""
    all_words = words("README.md")
    assert len(all_words) <= 1500, len(all_words)
    first = " ".join(all_words[:500])
    for needed in ("scripts/serve.sh", "scripts/test.sh", "localhost:8000/encode", "localhost:8000/sample",
                   "localhost:8000/anomaly-score", "http://127.0.0.1:8000/"):
        assert needed in first, needed


def test_the_anomaly_guide_stays_a_guide():
    assert len(words("docs/anomaly.md")) <= 2500


def test_each_measured_number_lives_in_one_document():
    """A number with two or more decimals (a measurement, not a count or a version) in more than one document
    is a copy that will drift: the results page holds it, the others link to it."""
    number = re.compile(r"(?<![\w.])\d+\.\d{2,}(?![\w.])")
    # Versions, and parameters a reader sets (alpha), are not measurements.
    setting = re.compile(r"(Python|torch|CUDA|podman|Pillow|version|α|alpha|=|–)\s*$", re.I)
    seen = {}
    for name in DOCUMENTS:
        for line in (REPO / name).read_text().splitlines():
            for match in number.finditer(line):
                if not setting.search(line[:match.start()]):
                    seen.setdefault(match.group(), set()).add(name)
    levels = {"0.01", "0.05"}  # the levels alpha is set to, quoted wherever p-values are explained
    repeated = {value: sorted(names) for value, names in seen.items() if len(names) > 1 and value not in levels}
    assert not repeated, repeated


def default_of(name: str):
    field = Settings.model_fields[name.lower()]
    return field.default


def quoted_defaults(document: str) -> dict:
    """``VAE_NAME`` (or ``NAME``, in the limits table) -> the default cell of every table row that names a
    setting with a literal default."""
    rows = {}
    for line in (REPO / document).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[0].strip("`").replace("VAE_", "").isupper():
            names = [n.strip(" `").replace("VAE_", "") for n in cells[0].split(",")]
            values = [v.strip(" `") for v in cells[1].split(",")]
            if len(names) == len(values):
                rows.update(zip(names, values))
    return rows


UNITS = {"MiB": 1024 ** 2, "Mi": 1024 ** 2, "s": 1, "rows per kernel": 1, "model requests": 1}


def parse(cell: str):
    cell = cell.strip()
    if cell in ("true", "false"):
        return cell == "true"
    if re.fullmatch(r"\d+²", cell):
        return int(cell[:-1]) ** 2
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(.*)", cell)
    if match is None:
        return cell
    value, unit = float(match.group(1)), match.group(2)
    return value * UNITS.get(unit, 1) if unit in UNITS or not unit else cell


@pytest.mark.parametrize("document", ["README.md", "docs/api.md"])
def test_the_defaults_the_documents_quote_are_the_settings(document):
    checked = 0
    for name, cell in quoted_defaults(document).items():
        if name.lower() not in Settings.model_fields or default_of(name) is None:
            continue  # a computed default (one per core...), said in words
        quoted, actual = parse(cell), default_of(name)
        actual = str(actual) if isinstance(actual, Path) else actual
        assert quoted == actual, (document, name, cell, actual)
        checked += 1
    assert checked >= 8, checked
