"""The docs stay true to the code: the README's opening commands and size, its links, the
configuration page generated from the schema, and the default recipe being the schema's defaults."""
import re

from conftest import ROOT
from fmnist_dist import config

README = (ROOT / "README.md").read_text()
MAX_README_BYTES = 15 * 1024


def test_readme_opens_with_the_two_commands_and_stays_short():
    opening = "\n".join(README.splitlines()[:20])
    assert "make train" in opening and "make test" in opening
    assert len(README.encode()) <= MAX_README_BYTES, "the README is a newcomer's page; details belong in docs/"


def test_readme_links_every_docs_page_and_each_exists():
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", README))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert linked == pages


def test_configuration_page_is_generated_from_the_schema():
    page = (ROOT / config.DOCS_PAGE).read_text()
    start, end = page.index(config.DOCS_BEGIN), page.index(config.DOCS_END) + len(config.DOCS_END)
    assert page[start:end] == config.markdown_table(), "run `make docs` (python -m fmnist_dist.config)"


def test_the_default_recipe_is_the_schemas_defaults():
    assert config.load(str(ROOT / config.DEFAULT_CONFIG)) == config.defaults()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README
