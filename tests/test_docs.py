"""The documentation's shape: the README is the front door (short), the manual lives in docs/, and no relative
link in either points at a file or a heading that is not there."""
import glob
import os
import re

from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 450
PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "deploy", "README.md"),
         *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `](` in a shell example is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _anchors(path: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation dropped, spaces to
    hyphens, and -1, -2, ... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(open(path, encoding="utf-8").read()).splitlines():
        m = re.match(r"^#{1,6} +(.*?) *#*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))       # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: str):
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(open(path, encoding="utf-8").read())):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):                  # http:, https:, mailto: are not checked
            yield target


def test_the_readme_is_a_front_door():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, (f"README.md has {n} lines, more than {README_MAX_LINES}: move the detail to a "
                                   f"page in docs/ and link it")


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    assert len(PAGES) > 3, PAGES
    broken = []
    for page in PAGES:
        for target in _links(page):
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            where = f"{os.path.relpath(page, ROOT)}: ({target})"
            if not os.path.exists(dest):
                broken.append(f"{where}: no file {os.path.relpath(dest, ROOT)}")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading with anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_a_broken_link(tmp_path):
    """The checker itself: a heading's anchor is found, a missing file and a missing heading are not."""
    page = tmp_path / "page.md"
    page.write_text("# Sharding θ over K servers\n\n## No loop at all: `--entry package.module:function`\n\n"
                    "```sh\n# not a heading](nope.md)\n```\n[a](page.md#sharding-θ-over-k-servers) [b](missing.md) "
                    "[c](#no-loop-at-all---entry-packagemodulefunction) [d](#not-there) [e](https://example.com/x)\n")
    assert _anchors(str(page)) == {"sharding-θ-over-k-servers", "no-loop-at-all---entry-packagemodulefunction"}
    assert list(_links(str(page))) == ["page.md#sharding-θ-over-k-servers", "missing.md",
                                       "#no-loop-at-all---entry-packagemodulefunction", "#not-there"]


def test_the_readme_test_command_is_the_one_ci_runs():
    """.ci/run runs the README's test command verbatim on a clean clone: change both together."""
    ci = [l for l in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
          if l.startswith("python3 -m venv")]
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(ci) == 1 and f"```sh\n{ci[0]}\n```" in readme, f".ci/run's {ci} is not the README's test command"
    assert "source .venv/bin/activate" in readme      # every later bare `paramserver` needs the venv


def test_every_file_the_readme_names_exists():
    """The architecture table is where a newcomer starts: a module it names that was moved or renamed is a
    dead end, so every `path/file.py` (and `folder/`) the README names in backticks must exist."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    named = set(re.findall(r"`((?:paramserver|common|worker|examples|deploy|tests|docs)/[\w./-]*)`", readme))
    assert len(named) > 15, named
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"the README names files that are not there: {missing}"


def _shape(line: str) -> str:
    """A line of output with what changes from run to run taken out: numbers, quoted text (the prompt), the
    counters, a train loss not reported yet, the spacing."""
    line = re.sub(r"\{[^}]*\}", "{}", line)
    line = re.sub(r"'[^']*'", "''", line)
    line = re.sub(r"train loss -", "train loss 0", line)
    line = re.sub(r"\d+(\.\d+)?", "#", line)
    return re.sub(r"\s+", " ", line).strip()


def _quoted_output(page: str, first: str) -> list[str]:
    """The lines of the page's output block that starts with `first` (a "..." stands for lines left out)."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    block = next(b for b in re.findall(r"^```[\w-]*\n(.*?)^```", text, flags=re.M | re.S) if first in b)
    return [ln for ln in block.splitlines() if ln.strip() and ln.strip() != "..." and not ln.startswith("$ ")]


def test_the_quoted_cluster_output_is_what_a_run_prints(cli, tmp_path, monkeypatch):
    """The README's (and docs/api.md's) example output, line by line and in order, has the shape of what a tiny
    real cluster run prints now (run in a scratch folder, so that its output folder is runs/cluster/ too)."""
    monkeypatch.chdir(tmp_path)
    r = cli("cluster", "--workers", "1", "--steps", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--context", "16", "--max-bytes", "100000", "--eval-every", "0", "--eval-batches", "2",
            "--sample-bytes", "8", "--progress-every", "0.1")
    assert r.returncode == 0, r.stdout + r.stderr
    printed = [_shape(ln) for ln in r.stdout.splitlines()]
    gpt_only = re.compile(r" \(# bits/byte\)$")   # your own model's run prints the held-out loss without it
    for page, first in (("README.md", "paramserver cluster: 1 server"), ("docs/api.md", "job examples.cnn_entry")):
        at = 0
        for line in _quoted_output(page, first):
            shape = re.sub(r"job [^,]+,", "job gpt,", _shape(line)).replace("runs/cnn/", "runs/cluster/")
            found = [i for i in range(at, len(printed)) if shape in (printed[i], gpt_only.sub("", printed[i]))]
            assert found, f"{page} quotes a line a run does not print (or not in this order):\n{line}\n" \
                          f"printed:\n{r.stdout}"
            at = found[0] + 1
