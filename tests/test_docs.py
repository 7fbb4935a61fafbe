"""The docs stay true to the code: the README's opening commands and size, its links, the
configuration page generated from the schema, and the default recipe being the schema's defaults."""
import re

from conftest import ROOT
from fmnist_dist import config

README = (ROOT / "README.md").read_text()
MAX_README_BYTES = 15 * 1024


def test_readme_opens_with_the_two_commands_and_stays_short():
    opening = "\n".join(README.splitlines()[:20])
    assert {"train", "test"} <= set(make_targets(opening)), "README.md: the first 20 lines must give `make train` " \
        "and `make test` as command lines"
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


def make_targets(script: str) -> list[str]:
    """The make target of each command line that starts with `make` (`make test-fast X=1` -> test-fast)."""
    return re.findall(r"^\s*make\s+([\w.-]+)", script, re.MULTILINE)


def test_ci_runs_the_readme_test_command():
    """`make test-fast` or `make tests` must not pass for `make test`: the targets are compared whole."""
    assert make_targets("make test-fast PYTEST_ARGS=-v\n") == ["test-fast"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert make_targets(ci) == ["test"], ".ci/run: expected exactly one make command, `make test` (the README's)"
    assert "test" in make_targets(README), "README.md: expected a command line `make test`"
