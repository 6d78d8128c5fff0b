"""
The public surface: ``__all__`` sorted and complete, every public callable
typed and documented, ``py.typed`` shipped, the API page listing every public
name, and the exception tree as documented.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import itertools
import pkgutil
import re
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cohortsync
import cohortsync.advice
import cohortsync.destinations
import cohortsync.destinations.catalog
import cohortsync.eligibility
import cohortsync.events
import cohortsync.exceptions
import cohortsync.identifiers
import cohortsync.otel
import cohortsync.serialization
import cohortsync.storage
import cohortsync.testing
import cohortsync.testing.pytest_plugin
from cohortsync.exceptions import CohortSyncError

MODULES = [
    cohortsync,
    cohortsync.advice,
    cohortsync.destinations,
    cohortsync.eligibility,
    cohortsync.events,
    cohortsync.exceptions,
    cohortsync.identifiers,
    cohortsync.otel,
    cohortsync.serialization,
    cohortsync.storage,
    cohortsync.testing,
]
# Modules that gather names defined elsewhere; the others define their own.
GATHERING = {
    "cohortsync",
    "cohortsync.destinations",
    "cohortsync.serialization",
    "cohortsync.storage",
    "cohortsync.testing",
}
MODULE_IDS = [m.__name__ for m in MODULES]
# Every public module: the ones above, the catalog (checked on its own below)
# and the pytest plugin (which imports pytest, so it is no module a host
# imports by hand).
PUBLIC_MODULES = [*MODULES, cohortsync.destinations.catalog, cohortsync.testing.pytest_plugin]
PUBLIC_MODULE_IDS = [m.__name__ for m in PUBLIC_MODULES]
ROOT = Path(__file__).resolve().parent.parent


def _is_constant(name: str) -> bool:
    """
    SCREAMING_SNAKE_CASE as ruff's RUF022 sees it: longer than one character
    and no lower-case letter.
    """
    return len(name) > 1 and name.upper() == name and any(c.isalpha() for c in name)


def _natural(name: str) -> list[tuple[int, int | str]]:
    # Digits compare as numbers ("Q2" < "Q10"), like ruff's natural sort.
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def isort_key(name: str) -> tuple[int, list[tuple[int, int | str]]]:
    """
    The isort-style order of ruff's RUF022: constants, then CamelCase classes,
    then everything else, each group in natural order.
    """
    if _is_constant(name):
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    return group, _natural(name)


def _defined_names(module: types.ModuleType, *, reexports: bool = True) -> set[str]:
    """
    Public names a module binds at top level: its own classes, functions and
    assignments and, with *reexports*, names imported from cohortsync; never
    names imported from elsewhere (``datetime``, ``Sequence``, ``annotations``).
    """
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif (
            reexports
            and isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("cohortsync")
        ):
            names.update(alias.asname or alias.name for alias in node.names)
    return {
        n
        for n in names
        if not n.startswith("_") and not isinstance(getattr(module, n, None), types.ModuleType)
    }


def _public_objects() -> Iterator[tuple[str, object]]:
    for module in MODULES:
        for name in module.__all__:
            yield f"{module.__name__}.{name}", getattr(module, name)


PUBLIC = list(_public_objects())


def _methods(cls: type) -> Iterator[tuple[str, Callable[..., object]]]:
    """
    The public methods a class defines itself (and ``__init__``), as functions.
    """
    for name, attr in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            func = attr.__func__
        elif isinstance(attr, property):
            if attr.fget is None:
                continue
            func = attr.fget
        elif inspect.isfunction(attr):
            func = attr
        else:
            continue
        # Protocol classes get typing's placeholder __init__: not ours to annotate.
        if func.__module__.startswith("cohortsync"):
            yield name, func


def _unannotated(func: Callable[..., object]) -> list[str]:
    sig = inspect.signature(func)
    missing = [
        p.name
        for i, p in enumerate(sig.parameters.values())
        if p.annotation is inspect.Parameter.empty and not (i == 0 and p.name in ("self", "cls"))
    ]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def _returned(func: Callable[..., object]) -> str:
    # Annotations are strings here (`from __future__ import annotations`).
    return str(inspect.signature(func).return_annotation)


def _returns_any(annotation: str) -> bool:
    return re.search(r"\bAny\b", annotation) is not None


class TestIsortKey:
    """The sort key orders names the way ruff's RUF022 does."""

    def test_groups(self) -> None:
        """Constants, then classes, then functions and modules."""
        names = ["check", "Sync", "DEFAULT_RULES", "catalog", "A", "Batch", "MAX_2"]

        assert ["DEFAULT_RULES", "MAX_2", "A", "Batch", "Sync", "catalog", "check"] == sorted(
            names, key=isort_key
        )

    def test_natural(self) -> None:
        """Numbers inside names sort by value."""
        assert ["v2", "v10"] == sorted(["v10", "v2"], key=isort_key)

    def test_case_sensitive(self) -> None:
        """Within a group, upper case sorts before lower case, as in ruff."""
        assert ["IOError", "IdentifierKind"] == sorted(["IdentifierKind", "IOError"], key=isort_key)


class TestAll:
    """Each public module's __all__ is sorted, complete and resolvable."""

    @pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
    def test_sorted(self, module: types.ModuleType) -> None:
        """__all__ is in RUF022's isort-style order."""
        assert sorted(module.__all__, key=isort_key) == list(module.__all__)

    @pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
    def test_no_duplicates(self, module: types.ModuleType) -> None:
        """No name is listed twice."""
        assert len(set(module.__all__)) == len(module.__all__)

    @pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
    def test_exists(self, module: types.ModuleType) -> None:
        """Every name in __all__ exists."""
        assert [] == [n for n in module.__all__ if not hasattr(module, n)]

    @pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
    def test_complete_by_source(self, module: types.ModuleType) -> None:
        """Every public name the module defines or re-exports is in __all__."""
        reexports = module.__name__ in GATHERING

        assert set() == _defined_names(module, reexports=reexports) - set(module.__all__)

    @pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
    def test_complete_at_runtime(self, module: types.ModuleType) -> None:
        """No public cohortsync class or function is reachable but unlisted."""
        unlisted = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__.startswith("cohortsync")
            and (module.__name__ in GATHERING or value.__module__ == module.__name__)
            and name not in module.__all__
        }

        assert set() == unlisted

    def test_public_submodules(self) -> None:
        """exceptions is the one submodule the top level itself exports."""
        exported = {
            n for n in cohortsync.__all__ if isinstance(getattr(cohortsync, n), types.ModuleType)
        }

        assert {"exceptions"} == exported

    def test_top_level_is_small(self) -> None:
        """
        The top level holds what a host uses every day, not every public name
        (42 since 0.2 added the new schedules' FirstRun and Weekday, bulk
        creation's SyncSpec, BulkResult and BulkFailure, and apply_syncs'
        ApplyResult; 44 since asyncio hosts got AsyncScheduler and
        AsyncDestination, the twins of the two names every host uses).
        """
        assert len(cohortsync.__all__) <= 44

    def test_no_name_twice(self) -> None:
        """
        A public name has one home: no submodule lists a name the top level
        lists (IdentifierMapping, defined in cohortsync.identifiers, is the
        one exception: hosts use it daily, identifier helpers live beside it).
        """
        top = set(cohortsync.__all__)
        twice = {
            (m.__name__, n)
            for m in MODULES[1:]
            for n in m.__all__
            if n in top and n != "IdentifierMapping"
        }

        assert set() == twice

    def test_catalog(self) -> None:
        """The catalog's __all__ is sorted and lists every preset and get()."""
        catalog = cohortsync.destinations.catalog

        assert sorted(catalog.__all__, key=isort_key) == list(catalog.__all__)
        assert _defined_names(catalog, reexports=False) == set(catalog.__all__)


class TestLazyImports:
    """Importing the package does not load what only some hosts need."""

    @pytest.mark.parametrize(
        "module",
        [
            "urllib.request",
            "http.client",
            "csv",
            "concurrent.futures",
            "sqlite3",
            "psycopg",
            "httpx",
            "opentelemetry",
            "cohortsync.otel",
            "cohortsync.destinations",
            "cohortsync.testing",
        ],
    )
    def test_not_loaded(self, module: str) -> None:
        """A fresh interpreter that imports cohortsync has not imported *module*."""
        code = f"import sys, cohortsync; sys.exit({module!r} in sys.modules)"

        assert 0 == subprocess.run([sys.executable, "-c", code], check=False).returncode  # noqa: S603 - fixed code

    def test_check_notices(self) -> None:
        """The check itself sees a module that is loaded."""
        code = "import sys, cohortsync; sys.exit('cohortsync._scheduler' in sys.modules)"

        assert 1 == subprocess.run([sys.executable, "-c", code], check=False).returncode  # noqa: S603 - fixed code

    @pytest.mark.parametrize(
        ("module", "name"),
        [
            ("cohortsync.storage", "SQLiteStorage"),
            ("cohortsync.storage", "PostgresStorage"),
            ("cohortsync.destinations", "WebhookDestination"),
            ("cohortsync.destinations", "CsvDirectoryDestination"),
            ("cohortsync.destinations", "UrllibTransport"),
            ("cohortsync.destinations", "AsyncWebhookDestination"),
            ("cohortsync.destinations", "HttpxTransport"),
            ("cohortsync.destinations", "AsyncHttpxTransport"),
        ],
    )
    def test_lazy_names_resolve(self, module: str, name: str) -> None:
        """A lazily imported name resolves to the class of that name."""
        value = getattr(importlib.import_module(module), name)

        assert name == value.__name__

    def test_unknown_name(self) -> None:
        """An unknown name is an AttributeError, as for any module."""
        with pytest.raises(AttributeError, match="Nope"):
            _ = cohortsync.storage.Nope  # type: ignore[attr-defined]


class TestTyping:
    """The package is typed for its users."""

    def test_py_typed(self) -> None:
        """py.typed ships inside the package directory."""
        assert (Path(cohortsync.__file__).parent / "py.typed").is_file()

    @pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[name for name, _ in PUBLIC])
    def test_annotated(self, name: str, obj: object) -> None:
        """Every public function and public method has all parameters and return annotated."""
        if inspect.isfunction(obj):
            functions: list[tuple[str, Callable[..., object]]] = [(name, obj)]
        elif inspect.isclass(obj) and not issubclass(obj, enum.Enum):
            functions = [(f"{name}.{m}", f) for m, f in _methods(obj)]
        else:
            functions = []  # constants, modules, type aliases, enums

        missing = {f_name: gaps for f_name, func in functions if (gaps := _unannotated(func))}

        assert {} == missing

    @pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[name for name, _ in PUBLIC])
    def test_no_any_returned(self, name: str, obj: object) -> None:
        """No public function or method returns Any: a host's mypy would stop checking there."""
        if inspect.isfunction(obj):
            functions: list[tuple[str, Callable[..., object]]] = [(name, obj)]
        elif inspect.isclass(obj):
            functions = [(f"{name}.{m}", f) for m, f in _methods(obj)]
        else:
            functions = []

        assert {} == {f_name: r for f_name, func in functions if _returns_any(r := _returned(func))}

    def test_any_check_finds_any(self) -> None:
        """The Any check itself notices Any in a return annotation, and only there."""

        def loose(a: Any) -> dict[str, Any]:
            return {"a": a}

        assert _returns_any(_returned(loose))
        assert not _returns_any(_returned(_returned))

    def test_annotation_check_finds_gaps(self) -> None:
        """The annotation check itself notices a missing annotation."""

        def untyped(a, b: int):  # type: ignore[no-untyped-def] # noqa: ANN001, ANN202
            return a

        assert ["a", "return"] == _unannotated(untyped)


def _own_doc(cls: type) -> str:
    """
    The docstring a class defines itself: a subclass is a concept of its own,
    and inheriting its base's words would describe the base.
    """
    doc = vars(cls).get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _member_doc(cls: type, name: str) -> str:
    """
    The docstring ``help()`` and the API page show for a public member: its
    own, or for an override that adds nothing to the contract, the one of the
    member it overrides (a store's ``claim_due`` is the protocol's).
    """
    for base in cls.__mro__:
        attr = vars(base).get(name)
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        elif isinstance(attr, property):
            attr = attr.fget
        if attr is not None and (doc := inspect.getdoc(attr)):
            return doc
    return ""


def _is_function(obj: object) -> bool:
    """
    A function of ours: a plain one, or one pytest wrapped as a fixture (not a
    type alias such as ``Resolver``, which is callable too).
    """
    return inspect.isroutine(obj) or (
        callable(obj) and getattr(obj, "__module__", "").startswith("cohortsync")
    )


def _undocumented(module: types.ModuleType) -> list[str]:
    """
    The public classes, functions, and methods and properties of public
    classes, of *module*'s ``__all__`` that have no docstring.
    """
    missing: list[str] = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            if not _own_doc(obj):
                missing.append(name)
            missing += [f"{name}.{m}" for m, _ in _methods(obj) if m != "__init__"]
            missing = [
                n for n in missing if "." not in n or not _member_doc(obj, n.split(".", 1)[1])
            ]
        elif _is_function(obj) and not inspect.getdoc(obj):
            missing.append(name)
    return missing


def _public_submodules() -> set[str]:
    """
    Every module of the package whose dotted name has no private part.
    """
    return {
        info.name
        for info in pkgutil.walk_packages(cohortsync.__path__, "cohortsync.")
        if not any(part.startswith("_") for part in info.name.split("."))
    }


class TestDocstrings:
    """Every public class, function, method and property says what it is for."""

    def test_every_public_module_is_checked(self) -> None:
        """A new public module joins the checks: nothing public escapes them."""
        assert {m for m in PUBLIC_MODULE_IDS if m != "cohortsync"} == _public_submodules()

    @pytest.mark.parametrize("module", PUBLIC_MODULES, ids=PUBLIC_MODULE_IDS)
    def test_module(self, module: types.ModuleType) -> None:
        """The module itself has a docstring."""
        assert inspect.getdoc(module)

    @pytest.mark.parametrize("module", PUBLIC_MODULES, ids=PUBLIC_MODULE_IDS)
    def test_members(self, module: types.ModuleType) -> None:
        """Each public class, function, method and property has a docstring."""
        assert [] == _undocumented(module)

    def test_check_finds_gaps(self) -> None:
        """The check notices a bare class, function, method, property and classmethod."""

        class Documented:
            """Has words."""

            def method(self) -> None:
                """Has words."""

        class Bare(Documented):
            def method(self) -> None:  # inherits Documented.method's words
                pass

            def other(self) -> None:
                pass

            @property
            def value(self) -> int:
                return 1

            @classmethod
            def make(cls) -> Bare:
                return cls()

        def bare() -> None:
            pass

        module = types.ModuleType("probe")
        module.__all__ = ["Bare", "Documented", "bare"]  # type: ignore[attr-defined]
        module.Bare, module.Documented, module.bare = Bare, Documented, bare  # type: ignore[attr-defined]
        Bare.__module__ = Documented.__module__ = "cohortsync.probe"
        for func in (Bare.method, Bare.other, Bare.value.fget, vars(Bare)["make"].__func__):
            func.__module__ = "cohortsync.probe"

        assert ["Bare", "Bare.other", "Bare.value", "Bare.make", "bare"] == _undocumented(module)


def _api_page() -> str:
    return (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def _automodules(page: str) -> set[str]:
    """
    Modules the page documents with ``automodule`` and ``:members:``: every
    name in their ``__all__`` that has a docstring appears, the rest silently not.
    """
    found = re.finditer(r"^\.\. automodule:: (\S+)\n((?:   .*\n)*)", page, re.MULTILINE)
    return {m[1] for m in found if re.search(r"^   :members:\s*$", m[2], re.MULTILINE)}


def _has_doc_comment(module: types.ModuleType, name: str) -> bool:
    """
    Whether a module-level constant carries a docstring (a string right after
    its assignment), which is what autodoc shows it with.
    """
    assert module.__file__ is not None
    body = ast.parse(Path(module.__file__).read_text(encoding="utf-8")).body
    for node, after in itertools.pairwise(body):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    return False


class TestApiPage:
    """docs/api.md documents every public name of every public module."""

    @pytest.mark.parametrize("module", PUBLIC_MODULES, ids=PUBLIC_MODULE_IDS)
    def test_every_name(self, module: types.ModuleType) -> None:
        """Each name is on the page by name, or shown by its module's automodule."""
        page = _api_page()
        auto = module.__name__ in _automodules(page)
        excluded = re.findall(r":exclude-members: (.*)", page)
        missing = []
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue  # a submodule: documented on its own
            named = re.search(
                rf"(:: ({re.escape(module.__name__)}\.|cohortsync\.)?{name}(\(|\n))", page
            )
            shown = auto and not any(name in line.split(", ") for line in excluded)
            if named is None and not (
                shown
                and (inspect.getdoc(obj) if _is_function(obj) else _has_doc_comment(module, name))
            ):
                missing.append(name)

        assert [] == missing

    def test_automodule_needs_docstrings(self) -> None:
        """The check knows automodule leaves out a constant without a docstring."""
        catalog = cohortsync.destinations.catalog

        assert _has_doc_comment(catalog, "FACEBOOK_ADS")
        assert not _has_doc_comment(catalog, "_HASHED")
        assert {"cohortsync.exceptions"} <= _automodules(_api_page())


def _exception_classes() -> list[type[BaseException]]:
    module = cohortsync.exceptions
    return [
        obj
        for name in module.__all__
        if inspect.isclass(obj := getattr(module, name)) and issubclass(obj, BaseException)
    ]


class TestExceptions:
    """Every error is a CohortSyncError and a fitting builtin, and the docstring draws them."""

    def test_all_are_exceptions(self) -> None:
        """cohortsync.exceptions exports nothing but exception classes."""
        assert len(cohortsync.exceptions.__all__) == len(_exception_classes())

    @pytest.mark.parametrize("exc", _exception_classes(), ids=lambda e: e.__name__)
    def test_root(self, exc: type[BaseException]) -> None:
        """Every exception subclasses the root CohortSyncError."""
        assert issubclass(exc, CohortSyncError)

    @pytest.mark.parametrize(
        "exc",
        [e for e in _exception_classes() if e is not CohortSyncError],
        ids=lambda e: e.__name__,
    )
    def test_builtin(self, exc: type[BaseException]) -> None:
        """Every leaf also subclasses the builtin that fits, so `except ValueError` works."""
        assert issubclass(exc, (ValueError, LookupError, RuntimeError))

    @pytest.mark.parametrize("exc", _exception_classes(), ids=lambda e: e.__name__)
    def test_docstring_tree(self, exc: type[BaseException]) -> None:
        """The module docstring's tree names every exception class."""
        doc = cohortsync.exceptions.__doc__ or ""

        assert re.search(rf"\b{exc.__name__}\b", doc)

    @pytest.mark.parametrize(
        ("exc", "builtin"),
        [
            ("ConfigurationError", ValueError),
            ("IneligibleSyncError", ValueError),
            ("InvalidMemberError", ValueError),
            ("NotFoundError", LookupError),
            ("SyncNotFoundError", LookupError),
            ("CohortNotFoundError", LookupError),
            ("DestinationNotFoundError", LookupError),
            ("SourceError", RuntimeError),
            ("LeaseLostError", RuntimeError),
            ("DuplicateRunError", RuntimeError),
            ("ConflictError", RuntimeError),
            ("CorruptStoreError", RuntimeError),
            ("DeliveryError", RuntimeError),
            ("RateLimitedError", RuntimeError),
        ],
    )
    def test_documented_builtin(self, exc: str, builtin: type[Exception]) -> None:
        """The tree's builtins are the real ones."""
        assert issubclass(getattr(cohortsync.exceptions, exc), builtin)

    def test_structured_attributes(self) -> None:
        """Leaves carry structured data, not just a message."""
        exc = cohortsync.exceptions

        assert 3.5 == exc.RateLimitedError(retry_after=3.5).retry_after
        assert isinstance(exc.RateLimitedError(), exc.TransientError)
        assert isinstance(exc.BadDataError("x"), exc.PermanentError)
        assert "s1" == exc.SyncNotFoundError("s1").sync_id
        lost = exc.LeaseLostError("s1", "worker-a", "0123456789")
        assert ("s1", "worker-a", "0123456789") == (lost.sync_id, lost.owner, lost.token)
        assert "0123456789" not in str(lost)
        conflict = exc.ConflictError("s1", expected=2, found=3)
        assert (2, 3) == (conflict.expected, conflict.found)
        assert (5, 4) == (
            exc.SchemaVersionError(5, 4).found,
            exc.SchemaVersionError(5, 4).supported,
        )


class TestVersion:
    """cohortsync.__version__ comes from the installed distribution's metadata."""

    def test_version_is_the_distributions(self) -> None:
        """__version__ is what importlib.metadata says (pyproject's version once installed)."""
        from importlib.metadata import version

        assert version("cohortsync") == cohortsync.__version__

    def test_version_without_metadata(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A source tree that was never installed still has a version: 0+unknown."""
        import importlib.metadata

        def missing(name: str) -> str:
            raise importlib.metadata.PackageNotFoundError(name)

        _ = cohortsync.__version__  # cached now: teardown puts the real one back
        monkeypatch.delitem(vars(cohortsync), "__version__")
        monkeypatch.setattr(importlib.metadata, "version", missing)

        assert "0+unknown" == cohortsync.__version__

    def test_version_is_read_lazily(self) -> None:
        """Importing cohortsync does not import importlib.metadata (slow to import)."""
        code = (
            "import sys, cohortsync; loaded = 'importlib.metadata' in sys.modules; "
            "v = cohortsync.__version__; sys.exit(2 * loaded + (not v))"
        )

        assert 0 == subprocess.run([sys.executable, "-c", code], check=False).returncode  # noqa: S603 - fixed code

    def test_other_names_still_raise(self) -> None:
        """The lazy __version__ leaves unknown attributes an AttributeError."""
        with pytest.raises(AttributeError, match="Shceduler"):
            _ = cohortsync.Shceduler  # type: ignore[attr-defined]
