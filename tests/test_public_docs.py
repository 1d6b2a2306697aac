"""Every public name of igdmfast is documented, as issue #6 asks.

For each module (except `_modidx` and `all`), every name in its `__all__`:
- a function or class has its own docstring whose first line is not empty (a dataclass's generated
  `Name(field, ...)` text does not count), and a `show_doc` entry (`### name`) in the processed docs of the notebook
  that exports the module, processed as the docs site shows it (`tools/build_docs.py`: nbdev's processors, cells
  executed as `nbdev-test` runs them; the executed notebooks are shared with the site build through `.docs_cache/`);
- a constant (a dict, tuple, number, ...) cannot carry a docstring of its own, so it must be named in that
  notebook's rendered text instead (in a markdown cell, or in a `show_doc` entry).
The tests fail listing the offenders. `test_nbdev_processing` checks that nbdev's own processing (the step of
`nbdev-docs` that runs `show_doc`, before Quarto) succeeds on each API notebook."""
import dataclasses, importlib, inspect, pkgutil, re, sys
from functools import lru_cache
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'tools'))
import build_docs  # noqa: E402
import igdmfast  # noqa: E402

SKIP = {'igdmfast._modidx', 'igdmfast.all'}
_re_exp = re.compile(r'^\s*#\|\s*default_exp\s+(\S+)', re.MULTILINE)

def modules() -> list[str]:
    "igdmfast's modules that have an `__all__` (packages without one export nothing)."
    names = [m.name for m in pkgutil.walk_packages(igdmfast.__path__, 'igdmfast.') if m.name not in SKIP]
    return [n for n in names if hasattr(importlib.import_module(n), '__all__') or not hasattr(importlib.import_module(n), '__path__')]

@lru_cache(maxsize=None)
def notebook_of(module: str) -> Path | None:
    "The notebook whose `default_exp` is `module`."
    from fastcore.nbio import read_nb
    nbs = Path(build_docs._cfg().nbs_path)
    for f in sorted(nbs.rglob('*.ipynb')):
        code = '\n'.join(c.source for c in read_nb(f).cells if c.cell_type == 'code')
        m = _re_exp.search(code)
        if m and f'igdmfast.{m.group(1)}' == module: return f
    return None

@lru_cache(maxsize=None)
def executed_api_docs() -> tuple[dict, list]:
    "The API notebooks as the docs site shows them ({notebook path under nbs/: processed notebook}, cell errors)."
    cfg = build_docs._cfg()
    nbs = Path(cfg.nbs_path)
    pages = [build_docs.Page(f.relative_to(nbs).as_posix()) for f in dict.fromkeys(map(notebook_of, modules())) if f is not None]
    return build_docs.execute_all(pages, nbs, cfg, n_workers=2, log=lambda *a: None)

def documented(nb_path: Path) -> tuple[set, str]:
    "Names with a `show_doc` entry (`### name`) in the processed notebook, and the text of its markdown cells."
    done, _ = executed_api_docs()
    nb = done[nb_path.relative_to(build_docs._cfg().nbs_path).as_posix()]
    shown, prose = set(), []
    for c in nb['cells']:
        if c['type'] == 'markdown': prose.append(c['source'])
        for o in c['outputs']:
            md = o.get('data', {}).get('text/markdown')
            if md: shown |= set(re.findall(r'^#{2,4}\s+(\S+)\s*$', build_docs._text(md), re.MULTILINE))
    return shown, '\n'.join(prose)

def own_doc(obj) -> str:
    "The object's own docstring ('' if none: an inherited or generated one does not count)."
    if inspect.isclass(obj):
        d = obj.__dict__.get('__doc__') or ''
        if dataclasses.is_dataclass(obj) and d.startswith(f'{obj.__name__}('): d = ''
        return d
    return getattr(obj, '__doc__', None) or ''

def is_api(obj) -> bool:
    "Functions and classes are documented with docstrings and `show_doc`; everything else is a constant."
    return inspect.isclass(obj) or inspect.isroutine(obj) or callable(obj) and hasattr(obj, '__wrapped__')

def offenders(module: str) -> list[str]:
    "What is undocumented in `module`, one line each."
    mod = importlib.import_module(module)
    if not hasattr(mod, '__all__'): return [f'{module} has no __all__']
    nb = notebook_of(module)
    if nb is None: return [f'{module}: no notebook has `#| default_exp {module[9:]}`']
    shown, prose = documented(nb)
    bad = [f'{nb.name}: {e.splitlines()[0]}' for e in executed_api_docs()[1] if Path(e.split(' cell ')[0]).name == nb.name]
    for name in mod.__all__:
        obj = getattr(mod, name, None)
        if obj is None and not hasattr(mod, name): bad.append(f'{module}.{name}: in __all__ but not defined'); continue
        if is_api(obj):
            doc = inspect.cleandoc(own_doc(obj)).strip()
            if not doc or not doc.splitlines()[0].strip(): bad.append(f'{module}.{name}: no docstring')
            home = getattr(obj, '__module__', module)  # a re-exported name is documented where it is defined
            home_nb = notebook_of(home) if home != module and home.startswith('igdmfast.') else nb
            if name not in (documented(home_nb)[0] if home_nb else ()): bad.append(f'{module}.{name}: no show_doc in {(home_nb or nb).name}')
        elif name not in shown and not re.search(rf'(?<![\w.]){re.escape(name)}(?!\w)', prose):
            bad.append(f'{module}.{name}: constant not named in the text (markdown) of {nb.name}')
    return bad

def test_modules_found():
    mods = modules()
    for m in ('igdmfast.core', 'igdmfast.attacks', 'igdmfast.losses', 'igdmfast.learner', 'igdmfast.evaluate'): assert m in mods
    assert 'igdmfast._modidx' not in mods and 'igdmfast.all' not in mods

def test_checker_catches_offenders(tmp_path):
    "The checks can fail: an undocumented function, a generated dataclass doc and an unnamed constant are caught."
    def f(x): return x
    @dataclasses.dataclass
    class D: a: int = 1
    assert own_doc(f) == '' and own_doc(D) == '' and is_api(f) and is_api(D) and not is_api({'a': 1})
    def g(x): "Documented."
    assert own_doc(g) == 'Documented.'

@lru_cache(maxsize=None)
def nbdev_proc_errors() -> dict:
    "{notebook: error or None} of nbdev's own processing of every API notebook (in worker processes)."
    return build_docs.nbdev_proc_errors(sorted({f for f in map(notebook_of, modules()) if f is not None}))

@pytest.mark.parametrize('module', modules())
def test_nbdev_processing(module):
    "nbdev's own docs processing (what `nbdev-proc-nbs` and `nbdev-docs` run before Quarto, `show_doc` execution included) succeeds."
    nb = notebook_of(module)
    assert nb is not None, f'no notebook exports {module}'
    err = nbdev_proc_errors()[nb]
    assert err is None, f'nbdev-proc-nbs would fail on {nb.name}: {err[-3000:]}'

@pytest.mark.parametrize('module', modules())
def test_public_names_documented(module):
    bad = offenders(module)
    assert not bad, f'{len(bad)} undocumented public name(s) in {module}:\n' + '\n'.join(bad)
