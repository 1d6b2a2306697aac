#!/usr/bin/env python3
"""Round-trip nbs/*.ipynb <-> percent-format .py files for editing notebooks as text (a dev helper).

    python tools/nbpy.py to-nb SRC.py DEST.ipynb   # '# %%' starts a code cell, '# %% [markdown]' a markdown cell
    python tools/nbpy.py to-py SRC.ipynb [DEST.py] # the reverse (stdout without DEST)

Outputs of existing cells are kept when the cell source is unchanged. The notebook stays the source of truth:
commit the .ipynb, not the .py."""
import hashlib, json, sys
from pathlib import Path

def _cells_from_py(text):
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        lines = list(buf)
        while lines and not lines[-1].strip(): lines.pop()
        while lines and not lines[0].strip(): lines.pop(0)
        if kind == 'markdown': lines = [l[2:] if l.startswith('# ') else l[1:] if l.startswith('#') else l for l in lines]
        cells.append((kind, '\n'.join(lines)))
    for line in text.splitlines():
        if line.startswith('# %%'):
            flush(); buf = []
            kind = 'markdown' if '[markdown]' in line else 'code'
        else: buf.append(line)
    flush()
    return cells

def _src(cell): return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']

def to_nb(src, dest):
    dest = Path(dest)
    old = {}
    if dest.exists():
        for c in json.loads(dest.read_text())['cells']:
            if c['cell_type'] == 'code': old[_src(c)] = c.get('outputs', [])
    cells, seen = [], set()
    for kind, s in _cells_from_py(Path(src).read_text()):
        lines = s.splitlines(keepends=True)
        cid, k = hashlib.sha1(s.encode()).hexdigest()[:8], 0   # stable ids keep nbdev-export deterministic
        while cid in seen: k += 1; cid = hashlib.sha1(f'{s}{k}'.encode()).hexdigest()[:8]
        seen.add(cid)
        if kind == 'markdown': cells.append(dict(cell_type='markdown', id=cid, metadata={}, source=lines))
        else: cells.append(dict(cell_type='code', execution_count=None, id=cid, metadata={}, outputs=old.get(s, []), source=lines))
    nb = dict(cells=cells, metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')),
              nbformat=4, nbformat_minor=5)
    dest.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')

def to_py(src):
    out = []
    for c in json.loads(Path(src).read_text())['cells']:
        s = _src(c)
        if c['cell_type'] == 'markdown':
            out.append('# %% [markdown]\n' + '\n'.join('# ' + l if l else '#' for l in s.splitlines()))
        else: out.append('# %%\n' + s)
    return '\n\n'.join(out) + '\n'

if __name__ == '__main__':
    cmd, *args = sys.argv[1:]
    if cmd == 'to-nb': to_nb(*args)
    elif cmd == 'to-py':
        text = to_py(args[0])
        if len(args) > 1: Path(args[1]).write_text(text)
        else: sys.stdout.write(text)
    else: sys.exit(__doc__)
