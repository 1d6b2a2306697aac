"""RobustBench's own model code for the tests: `pip install --no-deps robustbench==1.1.1` into a cache folder, then its
architecture modules loaded by file path and its model-zoo constructors read out of `cifar10.py`/`cifar100.py`.

`robustbench/__init__.py` and the model-zoo modules import the upstream `autoattack` and many architectures igdmfast
does not need, so nothing is imported as a package: the three architecture files the paper's teachers use
(`dm_wide_resnet.py`, `wide_resnet.py`, `resnet.py`, which import only torch) are executed as standalone modules, and
the `'model'` constructor of each `Linf` entry (a class such as `Chen2020EfficientNet` or a lambda) is compiled from
the model-zoo source, with exactly the class definitions it refers to, in a namespace holding those architectures.
"""
import ast, functools, importlib.util, os, shutil, subprocess, sys, tempfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VERSION = '1.1.1'
ARCHITECTURES = ('dm_wide_resnet', 'wide_resnet', 'resnet')


def installed(target:Path)->bool:
    "Whether `target` holds a complete `--target` install of robustbench `VERSION`."
    return ((target/f'robustbench-{VERSION}.dist-info').is_dir()
            and all((target/'robustbench'/'model_zoo'/'architectures'/f'{a}.py').is_file() for a in ARCHITECTURES))


def install(target:Path, timeout:float=600)->Path:
    "Install robustbench `VERSION` (no dependencies) into `target` unless it is there; raise RuntimeError saying why when pip fails."
    target = Path(target)
    if installed(target): return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}-', dir=target.parent))
    cmd = [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-compile', '--disable-pip-version-check',
           '--target', str(tmp), f'robustbench=={VERSION}']
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s: is PyPI reachable from this machine?") from None
    if r.returncode != 0 or not installed(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"Could not install robustbench=={VERSION} from PyPI (needed to compare igdmfast's teachers with "
                           f"RobustBench's own code): `{' '.join(cmd)}` exited {r.returncode}.\n{(r.stdout + r.stderr)[-2000:]}")
    if target.exists() and not installed(target): shutil.rmtree(target, ignore_errors=True)  # a broken earlier attempt
    try: os.replace(tmp, target)
    except OSError:  # another test process installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not installed(target): raise
    return target


def _exec_file(path:Path, name:str):
    "Execute the Python file `path` as a fresh standalone module called `name` (not added to `sys.modules`)."
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def architectures(target:Path)->dict:
    "The public names of RobustBench's architecture modules `ARCHITECTURES` (module -> its namespace)."
    folder = Path(target)/'robustbench'/'model_zoo'/'architectures'
    return {a: _exec_file(folder/f'{a}.py', f'_robustbench_{VERSION.replace(".", "_")}_{a}') for a in ARCHITECTURES}


class _Keywords(ast.NodeTransformer):
    "Replace the values of the keyword arguments `overrides` in every call (e.g. `depth=34` -> `depth=10`)."
    def __init__(self, overrides): self.overrides = overrides
    def visit_keyword(self, node):
        if node.arg in self.overrides: node.value = ast.Constant(self.overrides[node.arg])
        return node


def zoo(target:Path, dataset:str, names, **overrides)->dict:
    """RobustBench's `'model'` constructor of each `Linf` entry in `names` for `dataset` ('cifar10'/'cifar100'), with the
    keyword arguments `overrides` (e.g. `depth=10, widen_factor=2`) replaced in its source (a lambda) or passed (a class)."""
    src = Path(target)/'robustbench'/'model_zoo'/f'{dataset}.py'
    tree = ast.parse(src.read_text())
    ns = {'torch': torch, 'nn': nn, 'F': F, 'OrderedDict': OrderedDict}
    for mod in architectures(target).values(): ns.update({k: v for k, v in vars(mod).items() if not k.startswith('__')})
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    linf = next(n.value for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, 'id', None) == 'linf' for t in n.targets))
    out = {}
    for entry in linf.args[0].elts:
        name, spec = ast.literal_eval(entry.elts[0]), entry.elts[1]
        if name not in names: continue
        node = spec.values[[ast.literal_eval(k) for k in spec.keys].index('model')]
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in classes and n.id not in ns:
                exec(compile(ast.Module([classes[n.id]], type_ignores=[]), str(src), 'exec'), ns)
        if isinstance(node, ast.Lambda) and overrides: node = ast.fix_missing_locations(_Keywords(overrides).visit(node))
        made = eval(compile(ast.Expression(node), str(src), 'eval'), ns)
        out[name] = functools.partial(made, **overrides) if overrides and isinstance(made, type) else made
    missing = set(names) - set(out)
    if missing: raise KeyError(f"robustbench {VERSION} has no Linf entry {sorted(missing)} for {dataset}.")
    return out
