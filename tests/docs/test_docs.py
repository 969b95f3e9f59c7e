"""The docs stay true: the generated references match the code, every link resolves, every
Python example in the docs runs (the example plugin package installed for real), and the
quickstart and plugin tutorial show what the repository actually holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import tomllib

import adapterkit
from adapterkit.plugins import set_host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs")
sys.path.insert(0, DOCS)
import build  # noqa: E402  (docs/build.py)

PAGES = build.pages()
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
ANCHOR_ID = re.compile(r'<a id="([^"]+)"></a>')


def read(page: str) -> str:
    with open(os.path.join(DOCS, page), encoding="utf-8") as fh:
        return fh.read()


def links(page: str) -> list[str]:
    """Markdown link targets outside code blocks and code spans."""
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", read(page), flags=re.S))
    return LINK.findall(prose)


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", read(page), flags=re.S)


def anchors(page: str) -> set[str]:
    text = re.sub(r"```.*?```", "", read(page), flags=re.S)
    found = {build.slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    return found | set(ANCHOR_ID.findall(text))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The examples run tiny models: one intra-op thread avoids pool contention on busy cores."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_hook_reference_in_sync_with_hookspecs() -> None:
    committed = read("reference/hooks.md")
    assert committed == build.hook_reference(), "run python docs/build.py"
    for name in dir(adapterkit.hookspecs):
        if name.startswith("adapterkit_"):
            assert f"## `{name}(" in committed


def test_cli_reference_in_sync_with_click_commands() -> None:
    committed = read("reference/cli.md")
    assert committed == build.cli_reference(), "run python docs/build.py"
    for command in ("train", "adapt", "merge", "eval", "heatmap", "inspect", "ls", "cp", "import", "export"):
        assert f"## `adapterkit {command}`" in committed
    assert "--storage-option" in committed and "--resume" in committed


def test_every_page_is_in_the_navigation_and_linked_from_the_index() -> None:
    nav = [page for _, page in build.NAV]
    missing = sorted(set(PAGES) - set(nav))
    assert not missing, f"add {missing} to NAV in docs/build.py"
    index_links = {os.path.normpath(target.split("#")[0]) for target in links("index.md")}
    unlinked = sorted(set(PAGES) - {"index.md"} - index_links)
    assert not unlinked, f"docs/index.md should link {unlinked}"


@pytest.mark.parametrize("page", PAGES)
def test_links_and_anchors_resolve(page: str) -> None:
    base = os.path.dirname(os.path.join(DOCS, page))
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(base, path)) if path else os.path.join(DOCS, page)
        assert os.path.exists(resolved), f"{page}: broken link {target}"
        if anchor and resolved.endswith(".md") and resolved.startswith(DOCS):
            assert anchor in anchors(os.path.relpath(resolved, DOCS)), f"{page}: no anchor {target}"


def test_quickstart_shows_the_readme_commands_and_the_demo() -> None:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = [line for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
                for line in block.splitlines() if line.startswith("python3 ")]
    assert len(commands) == 2
    quickstart = read("quickstart.md")
    for command in commands:
        assert command in quickstart
    noxfile = open(os.path.join(ROOT, "noxfile.py"), encoding="utf-8").read()
    demo = noxfile[noxfile.index("def demo("):].split("\n@", 1)[0]
    runs = [" ".join(re.findall(r'"([^"]+)"', call.split("*session")[0]))
            for call in re.findall(r"session\.run\(([^)]*)\)", demo)]
    assert runs, "the demo session runs a command"
    for command in runs:  # the quickstart says what the main job runs
        assert f"`{command}`" in quickstart, command


def test_plugin_tutorial_shows_the_example_config() -> None:
    path = os.path.join(DOCS, "examples", "adapterkit_softmax", "softmax.toml")
    text = open(path, encoding="utf-8").read()
    assert f"```toml\n{text}```" in read("plugins.md")
    config = tomllib.loads(text)
    assert config["recipe"]["router"]["name"] == "softmax"


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """pip-install docs/examples/adapterkit_softmax for real into a private target dir."""
    target = str(tmp_path_factory.mktemp("softmax_plugin"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target,
         os.path.join(DOCS, "examples", "adapterkit_softmax")],
        check=True,
    )
    sys.path.insert(0, target)
    set_host(None)
    yield target
    sys.path.remove(target)
    set_host(None)


@pytest.fixture
def private_memory_fs() -> Iterator[None]:
    """Each page's examples see an empty ``memory://`` and leave the others' files alone."""
    from fsspec.implementations.memory import MemoryFileSystem

    store, dirs = dict(MemoryFileSystem.store), list(MemoryFileSystem.pseudo_dirs)
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]
    yield
    MemoryFileSystem.store.clear()
    MemoryFileSystem.store.update(store)
    MemoryFileSystem.pseudo_dirs[:] = dirs


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_docs_examples_run(page: str, example_plugin: str, private_memory_fs: None) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    for block in python_blocks(page):
        exec(compile(block, f"docs/{page}", "exec"), namespace)  # noqa: S102


def test_example_plugin_discovered(example_plugin: str) -> None:
    host = adapterkit.PluginHost()
    host.load_entry_points()
    assert host.plugins["softmax"].provides == {"router": ["softmax"]}
    assert host.plugins["softmax"].version == "0.1.0"


def test_build_renders_every_page(tmp_path) -> None:
    out = str(tmp_path / "site")
    as_html = build.render(out)
    suffix = ".html" if as_html else ".md"
    for page in PAGES:
        rendered = os.path.join(out, page[:-3] + suffix)
        assert os.path.getsize(rendered) > 0
    if as_html:
        index = open(os.path.join(out, "index.html"), encoding="utf-8").read()
        assert 'href="walkthrough.html"' in index and ".md)" not in index
        workflows = open(os.path.join(out, "workflows.html"), encoding="utf-8").read()
        assert '<h2 id="adapt-few-shot-learning-of-a-new-task">' in workflows
        walkthrough = open(os.path.join(out, "walkthrough.html"), encoding="utf-8").read()
        for target in re.findall(r'href="([^"#]+)', walkthrough):  # pages and files outside the site
            assert os.path.exists(os.path.normpath(os.path.join(out, target))), target
