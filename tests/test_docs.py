"""The user guide builds as the documentation site, with warnings as errors, and says what it should.

``sphinx-build -W --keep-going`` (what CI runs here, into a temporary folder): a broken internal link (a Markdown
link to a page or heading that does not exist, a toctree entry, a cross-reference), a page in no toctree, a
docstring that is not valid reStructuredText, all fail. External links are not followed (CI is offline); internal
ones are all checked. The notebooks are rendered from the outputs stored in them (no execution at build time);
the checks below find those outputs in the HTML, and the API pages' content generated from the docstrings.

Also: every ``docs/...`` path that a tracked text file of the repository cites (README, bundles' docs, scripts'
docstrings, code) exists, and every relative link of README.md resolves, so that a moved page is noticed where it
is cited, on a code host as on the site.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("pydata_sphinx_theme")

pytestmark = pytest.mark.xdist_group("docs")  # one worker builds the site once for every test here

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GUIDE = ["get_started", "choose_a_policy", "fit_your_gpu", "bundles", "model_zoo", "inference", "nnunet", "torch_compile",
         "troubleshooting"]
NETWORKS = ["UNet", "VNet", "DynUNet", "SegResNet", "SegResNetDS", "AttentionUnet", "SwinUNETR", "BasicUNet",
            "BasicUNetPlusPlus"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    from sphinx.cmd.build import build_main

    out = tmp_path_factory.mktemp("site")
    warnings = out / "warnings.txt"
    code = build_main(["-W", "--keep-going", "-q", "-E", "-b", "html", "-w", str(warnings),
                       "-d", str(out / "doctrees"), str(DOCS), str(out / "html")])
    assert code == 0, warnings.read_text()[-6000:]
    return out / "html"


def _text(html: str, tags: str = " ") -> str:
    """The words of a page: tags replaced by ``tags`` (a space between table cells; nothing inside a signature)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", tags, html))


def test_the_site_builds_without_a_warning_and_has_the_guide(site):
    for page in ["index", *(f"guide/{g}" for g in GUIDE), "tutorials", "benchmarks/index", "benchmarks/planner",
                 "api/index", "developer/architecture"]:
        assert (site / f"{page}.html").is_file(), page
    index = (site / "index.html").read_text()
    for caption in ["User guide", "Tutorials", "Benchmarks in depth", "Reference", "Developer"]:
        assert caption in index, caption


def test_choose_a_policy_has_a_table_per_network(site):
    html = (site / "guide" / "choose_a_policy.html").read_text()
    for name in NETWORKS:
        assert f'<section id="{name.lower()}">' in html, name
    text = _text(html)
    assert text.count("policy peak GiB % of plain step time x") == len(NETWORKS)
    assert "Let the planner choose" in text


def test_the_notebooks_are_rendered_with_their_outputs(site):
    pages = sorted((site / "notebooks").glob("*.html"))
    assert [p.stem for p in pages] == sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb"))
    for page in pages:
        html = page.read_text()
        assert 'class="cell_output' in html, f"{page.name}: no output rendered (outputs not committed?)"
    figures = [p.name for p in pages if re.search(r'<img [^>]*src="[^"]*\.png"', p.read_text())]
    assert len(figures) >= 3, figures  # the trade-off plot, the capacity plot, the overlay ...
    tradeoff = (site / "notebooks" / "02_policies_tradeoff.html").read_text()
    for img in re.findall(r'<img [^>]*src="([^"]+\.png)"', tradeoff):
        assert (site / "notebooks" / img).resolve().stat().st_size > 1000, img


def test_the_api_reference_is_generated_from_the_docstrings(site):
    text = _text((site / "api" / "networks.html").read_text(), tags="")
    for name in NETWORKS:
        assert re.search(rf"class monai_ckpt\.(networks\.)?Checkpoint{name}\(", text), name
    assert "checkpoint_policy" in text and "Parameters" in text  # napoleon turned Args: into a field list
    planner = _text((site / "api" / "planner.html").read_text(), tags="")
    assert "monai_ckpt.planner.plan" in planner and "budget_gb" in planner


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if n.endswith((".md", ".py", ".ipynb", ".json", ".toml", ".txt", ".yml"))
            and not n.startswith("docs/_build")]


def test_every_docs_path_the_repository_cites_exists():
    cited = re.compile(r"(?<![\w/.])docs/[\w./-]*[\w/]")
    missing = []
    for path in _tracked_text_files():
        if path.name == "CHANGELOG.md" or not path.is_file():  # the changelog records paths as they were
            continue
        # a bundle cites its own docs/, and pages say "each bundle's docs/README.md"
        roots = [d for d in path.parents if d == REPO or REPO in d.parents] + sorted((REPO / "bundles").glob("*/"))
        for ref in cited.findall(path.read_text(errors="replace")):
            if not ref.startswith("docs/_build") and not any((d / ref).exists() for d in roots):
                missing.append(f"{path.relative_to(REPO)}: {ref}")
    assert not missing, missing


def test_the_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 8 and any(link.startswith("docs/guide/") for link in local)
    assert not [link for link in local if not (REPO / link).exists()]
