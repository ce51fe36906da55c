"""The package as a user meets it: every public name resolves, submodules are modules, public functions and
classes have real docstrings that ``help()`` shows, and the docs they point to exist."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import pydoc
import re
import types
from pathlib import Path

import pytest
import torch

import kexue_fast

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    "kexue_fast",
    "kexue_fast.ops",
    "kexue_fast.reference",
    "kexue_fast.nn",
    "kexue_fast.ebm",
    "kexue_fast.iresnet",
]
#: The op functions: their docstrings also say which errors they raise and link to their docs page.
OP_FUNCTIONS = [
    "cond_layer_norm", "spectral_norm_power_iter_", "spectral_sigma", "philox_normal", "langevin_step_", "ema_update_",
    "iresnet_inverse",
]  # fmt: skip


def _public_objects():
    """(qualified name, object) of every function and class in the ``__all__`` of the public packages."""
    seen = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                seen.setdefault(id(obj), (f"{package}.{name}", obj))
    return sorted(seen.values(), key=lambda item: item[0])


def _methods(cls):
    """Public methods defined by ``cls`` itself, except ``nn.Module`` hooks torch documents (``extra_repr``)."""
    for name, member in vars(cls).items():
        function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if name.startswith("_") or not inspect.isfunction(function):
            continue
        if name != "forward" and issubclass(cls, torch.nn.Module) and hasattr(torch.nn.Module, name):
            continue
        yield f"{cls.__qualname__}.{name}", function


def _parameters(function) -> list[str]:
    skip = {"self", "cls", "device", "dtype"}  # factory kwargs, as in every torch.nn module
    return [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _mentions(doc: str, name: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", doc) is not None


def _documented_callables():
    for qualname, obj in _public_objects():
        if inspect.isclass(obj):
            own_init = obj.__init__ if "__init__" in vars(obj) else None
            doc = "\n".join(filter(None, [inspect.getdoc(obj), own_init and inspect.getdoc(own_init)]))
            params = _parameters(own_init) if own_init else []
            yield qualname, obj, doc, params
            for method_name, method in _methods(obj):
                yield f"{obj.__module__}.{method_name}", method, inspect.getdoc(method) or "", _parameters(method)
        else:
            yield qualname, obj, inspect.getdoc(obj) or "", _parameters(obj)


CALLABLES = list(_documented_callables())


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_resolves(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names {missing}, which do not exist"


@pytest.mark.parametrize("package", ["kexue_fast.ops", "kexue_fast.reference", "kexue_fast.nn"])
def test_submodules_are_reachable_as_modules(package):
    module = importlib.import_module(package)
    names = [info.name for info in pkgutil.iter_modules(module.__path__)]
    assert names, f"{package} has no submodules"
    for name in names:
        submodule = importlib.import_module(f"{package}.{name}")
        assert getattr(module, name) is submodule, f"{package}.{name} is {getattr(module, name)!r}, not its module"


def test_top_level_exposes_the_op_functions_and_the_subpackages():
    for name in ("ops", "nn", "ebm", "ema", "reference"):
        assert isinstance(getattr(kexue_fast, name), types.ModuleType), name
    for name in OP_FUNCTIONS:
        function = getattr(kexue_fast, name)
        assert inspect.isfunction(function), name
        assert getattr(kexue_fast.reference, name).__module__.startswith("kexue_fast.reference."), name
    assert inspect.isclass(kexue_fast.EMA)


@pytest.mark.parametrize(("qualname", "obj", "doc", "params"), CALLABLES, ids=[c[0] for c in CALLABLES])
def test_public_callable_has_a_docstring_naming_its_arguments(qualname, obj, doc, params):
    assert len(doc.split()) >= 8, f"{qualname} has no real docstring: {doc!r}"
    unnamed = [p for p in params if not _mentions(doc, p)]
    assert not unnamed, f"the docstring of {qualname} does not mention its arguments {unnamed}"


@pytest.mark.parametrize("name", OP_FUNCTIONS)
def test_op_docstring_names_its_errors_and_docs_page_and_help_shows_it(name):
    function = getattr(kexue_fast, name)
    doc = inspect.getdoc(function) or ""
    assert re.search(r"\b(TypeError|ValueError|RuntimeError)\b", doc), f"kexue_fast.{name}: no errors documented"
    pages = re.findall(r"docs/[\w./-]+\.md", doc)
    assert pages, f"kexue_fast.{name}: the docstring links to no docs/ page"
    assert all((ROOT / page).is_file() for page in pages), pages
    shown = pydoc.render_doc(function, renderer=pydoc.plaintext)
    assert doc.splitlines()[0] in shown


def _shipped_text_files():
    patterns = ["kexue_fast/**/*.py", "triton_kernels/*.py", *(f"csrc/**/*.{ext}" for ext in ("h", "cpp", "cu", "cuh"))]
    files = sorted(path for pattern in patterns for path in ROOT.glob(pattern))
    return [*files, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_no_reference_to_a_spec_file_users_do_not_have():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _shipped_text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"SPEC(\.md| ?§)", line)
    ]
    assert not offenders, "point at docs/ instead of SPEC: " + ", ".join(offenders)


def test_every_docs_link_points_at_an_existing_page():
    broken = sorted(
        {
            f"{path.relative_to(ROOT)} -> {link}"
            for path in _shipped_text_files()
            for link in re.findall(r"docs/[\w-]+\.md", path.read_text(encoding="utf-8"))
            if not (ROOT / link).is_file()
        }
    )
    assert not broken, broken


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_docs_pages_resolve_to_a_page_and_heading():
    pages = {page.name: page.read_text(encoding="utf-8") for page in (ROOT / "docs").glob("*.md")}
    anchors = {name: {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)} for name, text in pages.items()}
    broken = [
        f"{name} -> {target}{'#' + anchor if anchor else ''}"
        for name, text in pages.items()
        for target, anchor in re.findall(r"\]\(([\w-]+\.md)(?:#([\w-]+))?\)", text)
        if target not in pages or (anchor and anchor not in anchors[target])
    ]
    assert not broken, broken


def test_package_ships_its_typing_marker_and_license():
    assert (ROOT / "kexue_fast" / "py.typed").is_file()
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License") and "the kexue_fast authors" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and f"## [{kexue_fast.__version__}]" in changelog


def _docs_examples():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for number, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)):
            yield pytest.param(block, id=f"{page.stem}-{number}")


@pytest.mark.parametrize("code", list(_docs_examples()))
def test_docs_example_runs_as_written(code):
    exec(compile(code, "<docs example>", "exec"), {"__name__": "docs_example"})
