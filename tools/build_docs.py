#!/usr/bin/env python3
"""Build the documentation site offline, without Quarto (which cannot be installed on our machines).

    python tools/build_docs.py [--out _site_offline] [--n-workers 2] [--no-cache] [--keep-going]

The notebooks go through nbdev's own processors, the ones `nbdev-proc-nbs` runs (frontmatter, a `show_doc` cell
after every exported function and class, hidden and exported cells dropped, links to documented names), except
that nbdev's `exec_show_docs` step is replaced by one that runs every cell `nbdev-test` would run (execnb; cells
flagged with `tst_flags` or `eval: false` and `skip_exec` notebooks are left out), so the tables and plots appear
although the notebooks are committed without outputs. Each notebook becomes one HTML page: a sidebar read from
`nbs/sidebar.yml`, highlighted code (pygments), markdown tables, math as MathML, figures as PNG files beside the
page and one local stylesheet. Nothing is fetched from the network when the site is viewed.

Executed notebooks are cached in `.docs_cache/`, keyed by the notebook, the library sources and nbdev's version. A
cell that raises makes the build exit with status 1 (after writing the site) unless `--keep-going` is given."""
from __future__ import annotations
import argparse, base64, hashlib, html, json, multiprocessing, os, posixpath, re, shutil, sys, time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT/'.docs_cache'
_re_ansi = re.compile(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])')
_re_scheme = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*:')

def _cfg():
    "The project's nbdev config (from pyproject.toml's [tool.nbdev])."
    from nbdev.config import get_config
    return get_config(ROOT)

# ---------------------------------------------------------------- pages and navigation

@dataclass
class Page:
    "One notebook of the site: its path under nbs/, its HTML path under the site root, and its nav section."
    src: str
    section: str | None = None
    title: str = ''
    description: str = ''

    @property
    def href(self) -> str: return html_path(self.src)

def html_path(src: str) -> str:
    "The site path of notebook `src` (nbdev's naming: `01_attacks.ipynb` -> `attacks.html`)."
    from nbdev.config import nbpath2html
    return nbpath2html(Path(src)).as_posix()

def _listed(nbs: Path, entry: str) -> list[str]:
    "Notebooks under `nbs` named by one sidebar entry (a path or a glob)."
    if not any(ch in entry for ch in '*?['): return [entry] if (nbs/entry).is_file() else []
    return [p.relative_to(nbs).as_posix() for p in sorted(nbs.glob(entry))
            if p.suffix == '.ipynb' and not any(s[0] in '_.' for s in p.relative_to(nbs).parts)]

def _entries(item) -> tuple[str | None, list[str]]:
    "(section title, entries) of one item of the sidebar's `contents`."
    if isinstance(item, str): return None, [item]
    contents = item.get('contents', item.get('auto', item.get('href', [])))
    return item.get('section', item.get('text')), [contents] if isinstance(contents, str) else list(contents)

def _flatten(item, section=None) -> list[tuple[str | None, str]]:
    "(section, entry) pairs of one sidebar item; nested sections are listed under their top-level title."
    if isinstance(item, str): return [(section, item)]
    sec, entries = _entries(item)
    return [pair for e in entries for pair in _flatten(e, section or sec)]

def _all_notebooks(nbs: Path) -> list[str]:
    "Every notebook under `nbs`, skipping folders and files that start with `_` or `.`."
    return _listed(nbs, '**/*.ipynb')

def read_nav(nbs: Path) -> list[Page]:
    "The pages in sidebar order (`nbs/sidebar.yml`); notebooks it does not name come last."
    import yaml
    side = nbs/'sidebar.yml'
    items = (yaml.safe_load(side.read_text()) or {}).get('website', {}).get('sidebar', {}).get('contents', []) if side.exists() else []
    pages, seen = [], set()
    for section, entry in (pair for item in items for pair in _flatten(item)):
        for src in _listed(nbs, entry):
            if src not in seen: seen.add(src); pages.append(Page(src, section))
    pages += [Page(src, 'More') for src in _all_notebooks(nbs) if src not in seen]
    return pages

def _titles(pages: list[Page], nbs: Path, cfg):
    "Fill each page's title and description from its notebook's frontmatter."
    from fastcore.nbio import read_nb, nb_frontmatter
    for p in pages:
        fm = nb_frontmatter(read_nb(nbs/p.src))
        p.title = str(fm.get('title') or Path(p.src).stem)
        p.description = str(fm.get('description') or '')
        if p.src == 'index.ipynb' and not fm.get('title'): p.title = cfg.title

# ---------------------------------------------------------------- nbdev processing and execution (in workers)

def _skip_cell(nb, skip_flags):
    "Predicate for the cells `nbdev-test` would not run in `nb` (`tst_flags`, `eval: false`, `skip_exec`)."
    from fastcore.nbio import nb_frontmatter, fm_default_eval, does_cell_eval
    from nbdev.process import nb_lang
    fm = nb_frontmatter(nb)
    if str(fm.get('skip_exec', '')).lower() in ('true', '1', 'yes') or nb_lang(nb) != 'python': return lambda c: True
    dflt = fm_default_eval(fm)
    return lambda c: c.cell_type != 'code' or not does_cell_eval(c, dflt) or bool(set(skip_flags) & set(c.directives))

def _exec_all_proc(errors: list, keep_going: bool):
    "An nbdev processor that runs every cell not marked `noexec_` in one execnb shell, as `nbdev-test` does."
    from execnb.shell import CaptureShell
    from nbdev.process import Processor
    class exec_all(Processor):
        "Run the notebook's testable cells and the `show_doc` cells nbdev added, keeping their outputs."
        def begin(self):
            from nbdev.config import get_config
            self.timeout = int(get_config().get('cell_timeout', 600)) or None  # nbdev-test's limit per cell
            self.k = CaptureShell(self.nb.path_, mpl_format='retina')
            self.k.run_cell('from nbdev.showdoc import show_doc')
            self.stopped = False
        def __call__(self, cell):
            if cell.cell_type != 'code' or getattr(cell, 'noexec_', False) or self.stopped: return
            self.k.cell(cell, timeout=self.timeout)
            if self.k.exc is None: return
            errors.append(f"{self.nb.path_} cell {cell.idx_}: {type(self.k.exc).__name__}: {self.k.exc}\n{cell.source}")
            self.k.exc, self.stopped = None, not keep_going
    return exec_all

def process_nb(path, execute: bool = True, skip_flags=(), keep_going: bool = False):
    "The notebook at `path` after nbdev's docs processing; with `execute`, run as `nbdev-test` runs it. Returns (nb, errors)."
    from fastcore.nbio import read_nb
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults, exec_show_docs
    path, errors = Path(path).resolve(), []
    nb = read_nb(path)
    nb.path_ = str(path)
    procs = FilterDefaults().procs()
    if execute:
        skip = (lambda c: True) if (path.parent/'.notest').exists() else _skip_cell(nb, skip_flags)  # nbdev-test's ignore file
        for c in nb.cells: c.noexec_ = bool(skip(c))
        procs = [_exec_all_proc(errors, keep_going) if p is exec_show_docs else p for p in procs]
    with _in_test(), working_directory(path.parent): NBProcessor(nb=nb, procs=procs, rm_directives='quarto').process()
    return nb, errors

@contextmanager
def _in_test():
    "Set `IN_TEST=1` as `nbdev-test` does while notebooks run, then restore it."
    old = os.environ.get('IN_TEST')
    os.environ['IN_TEST'] = '1'
    try: yield
    finally:
        if old is None: os.environ.pop('IN_TEST', None)
        else: os.environ['IN_TEST'] = old

def _jsonable(o):
    "Plain JSON data from nbdev/execnb cell and output objects."
    return json.loads(json.dumps(o, default=lambda x: list(x) if hasattr(x, '__iter__') else str(x)))

def plain_nb(nb) -> dict:
    "The parts of a processed notebook the renderer needs: frontmatter and cells (type, source, outputs)."
    cells = [dict(type=c.cell_type, source=c.source, outputs=_jsonable(c.get('outputs', [])),
                  attachments=_jsonable(c.get('attachments', {})), show_doc=bool(getattr(c, 'has_sd', False)))
             for c in nb.cells if c.cell_type != 'raw']
    return dict(frontmatter=_jsonable(getattr(nb, 'frontmatter_', {})), cells=cells)

def _proc_error(path) -> str | None:
    "Worker: run nbdev's own docs processing (as `nbdev-proc-nbs`) on the notebook at `path`; the error, or None."
    try: process_nb(path, execute=False); return None
    except Exception as e: return f'{type(e).__name__}: {e}'

def _pool(n_workers: int, n_jobs: int) -> ProcessPoolExecutor:
    "Worker processes started fresh (spawn): forking a process that already ran torch can deadlock its thread pools."
    return ProcessPoolExecutor(max(1, min(n_workers, n_jobs)), mp_context=multiprocessing.get_context('spawn'))

def nbdev_proc_errors(paths, n_workers: int = 2) -> dict:
    "{notebook: error or None} of nbdev's own docs processing, `show_doc` execution included (what `nbdev-docs` runs before Quarto)."
    with _pool(n_workers, len(paths)) as ex: return dict(zip(paths, ex.map(_proc_error, paths)))

def _work(args):
    "Worker: process and execute one notebook; returns (src, plain notebook, errors, seconds)."
    path, src, skip_flags, keep_going = args
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # as nbdev-test does (its `basepath`)
    t0 = time.time()
    nb, errors = process_nb(path, True, skip_flags, keep_going)
    return src, plain_nb(nb), errors, time.time() - t0

# ---------------------------------------------------------------- cache

EXEC_VERSION = 1  # bump when the processing or execution above changes what a cached notebook holds

def _lib_digest(cfg) -> str:
    "Hash of what executed outputs depend on besides the notebook: the library sources, nbdev's version, `EXEC_VERSION`."
    import nbdev, execnb
    h = hashlib.sha256(f'{EXEC_VERSION} {nbdev.__version__} {execnb.__version__}'.encode())
    for p in sorted(Path(cfg.lib_path).rglob('*.py')): h.update(p.as_posix().encode()); h.update(p.read_bytes())
    return h.hexdigest()

def _cache_file(nbs: Path, src: str, lib: str, flags) -> Path:
    "Where the executed notebook `src` is cached for this library state and these flags."
    key = hashlib.sha256((nbs/src).read_bytes() + lib.encode() + ' '.join(flags).encode()).hexdigest()[:20]
    return CACHE/f"{src.replace('/', '__')}.{key}.json"

def _cache_get(f: Path):
    "The cached (plain notebook, seconds) in `f`, or None."
    if not f.exists(): return None
    d = json.loads(f.read_text())
    return d['nb'], d['secs']

def _cache_put(f: Path, nb: dict, secs: float):
    "Store an executed notebook, dropping older entries of the same notebook."
    f.parent.mkdir(parents=True, exist_ok=True)
    for old in f.parent.glob(f.name.rsplit('.', 2)[0] + '.*.json'): old.unlink()
    tmp = f.with_suffix('.tmp'); tmp.write_text(json.dumps(dict(nb=nb, secs=secs))); tmp.replace(f)

def execute_all(pages, nbs, cfg, n_workers=2, use_cache=True, keep_going=False, log=print):
    "Process and execute every page's notebook (cached, in `n_workers` processes); returns ({src: nb}, errors)."
    flags, lib = cfg.tst_flags.split(), _lib_digest(cfg)
    done, errors, todo = {}, [], []
    for p in pages:
        hit = _cache_get(_cache_file(nbs, p.src, lib, flags)) if use_cache else None
        if hit: done[p.src] = hit[0]; log(f"  {p.src}: cached ({hit[1]:.1f} s when run)")
        else: todo.append(p.src)
    with _pool(n_workers, len(todo)) as ex:
        futs = [ex.submit(_work, (nbs/src, src, flags, keep_going)) for src in todo]
        for fut in as_completed(futs):
            src, nb, errs, secs = fut.result()
            done[src] = nb; errors += errs
            log(f"  {src}: executed in {secs:.1f} s" + (f" with {len(errs)} error(s)" if errs else ''))
            if not errs and use_cache: _cache_put(_cache_file(nbs, src, lib, flags), nb, secs)
    return done, errors

# ---------------------------------------------------------------- rendering

def _strip_ansi(s: str) -> str: return _re_ansi.sub('', s)

def _text(x) -> str: return ''.join(x) if isinstance(x, list) else str(x)

def _console(s: str) -> str:
    "Terminal text as a console shows it: ANSI codes dropped, each line's carriage-return overwrites applied."
    return '\n'.join(l.rstrip('\r').split('\r')[-1] for l in _strip_ansi(s).split('\n'))

def slugify(text: str) -> str:
    "Pandoc's (and so Quarto's) heading identifier: lower case, only alphanumerics and `_-.`, spaces as dashes."
    s = re.sub(r'[^\w\-. ]', '', text.strip().lower()).replace(' ', '-')
    return re.sub(r'^[^a-z]+', '', s) or 'section'

def _math(tex: str, opts: dict) -> str:
    "MathML for `tex` (browsers render it natively); the escaped source when it cannot be converted."
    try:
        from latex2mathml.converter import convert
        return convert(tex, display='block' if opts.get('display_mode') else 'inline')
    except Exception: return f'<code class="math">{html.escape(tex)}</code>'

def highlight(code: str, lang: str = 'python') -> str:
    "Code highlighted by pygments, as `<pre class=\"highlight\"><code>…` (markdown-it keeps a block that starts with `<pre`)."
    from pygments import highlight as _hl
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name, TextLexer
    try: lexer = get_lexer_by_name(lang or 'text')
    except Exception: lexer = TextLexer()
    cls = f' class="language-{html.escape(lang)}"' if lang else ''
    return f'<pre class="highlight"><code{cls}>{_hl(code, lexer, HtmlFormatter(nowrap=True))}</code></pre>\n'

_re_fdiv = re.compile(r'^:::+\s*\{([^}]*)\}\s*$|^:::+\s*(\S+)?\s*$', re.MULTILINE)
_re_linkattr = re.compile(r'(\]\([^)\s]*\))\{[^}\n]*\}')
_re_srclink = re.compile(r'\[source\]\((/[^)\s]*)\)\{[^}\n]*\}\n*')

def quarto_md(text: str) -> str:
    "Markdown with the Quarto extras nbdev emits turned into plain HTML/CommonMark (fenced divs, link attributes)."
    text = _re_srclink.sub('', text)  # a `show_doc` source link with no repository URL: nowhere to point to
    text = _re_linkattr.sub(r'\1', text)
    def div(m):
        attrs = m.group(1) if m.group(1) is not None else m.group(2)
        if attrs is None: return '\n</div>\n'
        classes = ' '.join(a.lstrip('.') for a in attrs.split() if a.startswith('.') or '=' not in a)
        return f'<div class="{html.escape(classes)}">\n'
    return _re_fdiv.sub(div, text)

class PageRenderer:
    "Renders the cells of one page to HTML; collects its figures and gives its headings unique ids."
    def __init__(self, page: Page):
        from markdown_it import MarkdownIt
        from mdit_py_plugins.anchors import anchors_plugin
        from mdit_py_plugins.dollarmath import dollarmath_plugin
        self.page, self.figures, self.ids, self.reserved, self.in_doc = page, {}, set(), set(), False
        self.md = MarkdownIt('commonmark', {'html': True, 'highlight': lambda c, l, a: highlight(c, l or 'text')})
        self.md.enable(['table', 'strikethrough'])
        dollarmath_plugin(self.md, allow_digits=False, double_inline=True, renderer=_math)
        anchors_plugin(self.md, min_level=1, max_level=6, slug_func=self.slug)

    def reserve(self, cells: list):
        "Keep the plain ids of `show_doc` headings (`### name`) for them: nbdev links to `page.html#name`."
        for c in cells:
            for o in c['outputs'] if _is_doc(c) else []:
                md = _text(o.get('data', {}).get('text/markdown', ''))
                self.reserved |= {slugify(n) for n in re.findall(r'^#{2,4}\s+(\S+)\s*$', md, re.MULTILINE)}

    def slug(self, text: str) -> str:
        "A heading id unique on this page; other headings step aside for the reserved `show_doc` ids."
        taken = self.ids if self.in_doc else self.ids | self.reserved
        base = s = slugify(text); i = 0
        while s in taken: i += 1; s = f'{base}-{i}'
        self.ids.add(s)
        return s

    def markdown(self, text: str) -> str: return self.md.render(quarto_md(text))

    def figure(self, b64: str, ext: str) -> str:
        "Save a figure beside the page; returns its path relative to the page."
        name = f"{Path(self.page.href).stem}_files/figure-{len(self.figures)+1}.{ext}"
        self.figures[name] = base64.b64decode(b64)
        return name

    def output(self, o: dict) -> str:
        "HTML for one cell output."
        kind = o.get('output_type')
        if kind == 'stream':
            return f'<div class="cell-output cell-output-{o.get("name", "stdout")}"><pre>{html.escape(_console(_text(o.get("text", ""))))}</pre></div>'
        if kind == 'error':
            tb = _console('\n'.join(o.get('traceback', [])) or f"{o.get('ename')}: {o.get('evalue')}")
            return f'<div class="cell-output cell-output-error"><pre>{html.escape(tb)}</pre></div>'
        data, meta = o.get('data', {}), o.get('metadata', {})
        for mime, ext in (('image/png', 'png'), ('image/jpeg', 'jpg')):
            if mime in data:
                m = meta.get(mime, {})
                size = ''.join(f' {k}="{int(m[k])}"' for k in ('width', 'height') if k in m)
                src = self.figure(_text(data[mime]).replace('\n', ''), ext)
                return f'<div class="cell-output cell-output-display"><img class="figure" src="{src}"{size} alt="figure"></div>'
        if 'image/svg+xml' in data: return f'<div class="cell-output cell-output-display">{_text(data["image/svg+xml"])}</div>'
        if 'text/markdown' in data: return f'<div class="cell-output cell-output-markdown">{self.markdown(_text(data["text/markdown"]))}</div>'
        if 'text/html' in data: return f'<div class="cell-output cell-output-display">{_text(data["text/html"])}</div>'
        if 'text/latex' in data: return f'<div class="cell-output">{self.markdown(_text(data["text/latex"]))}</div>'
        if 'text/plain' in data: return f'<div class="cell-output cell-output-plain"><pre>{html.escape(_console(_text(data["text/plain"])))}</pre></div>'
        return ''

    def cell(self, c: dict) -> str:
        "HTML for one cell, honouring the Quarto directives nbdev leaves (`echo`, `output`, `include`, `code-fold`)."
        if c['type'] == 'markdown': return self.attachments(c) or self.markdown(c['source'])
        dirs, code = _directives(c['source'])
        if dirs.get('include') == 'false': return ''
        parts = []
        if code.strip() and dirs.get('echo', 'true') != 'false':
            src = f'<div class="cell-code">{highlight(code)}</div>'
            if 'code-fold' in dirs:
                opened = ' open' if dirs['code-fold'] == 'show' else ''
                src = f'<details class="code-fold"{opened}><summary>{html.escape(dirs.get("code-summary", "Code").strip(chr(34)))}</summary>{src}</details>'
            parts.append(src)
        self.in_doc = _is_doc(c)
        if dirs.get('output', 'true') != 'false': parts += [self.output(o) for o in _merge_streams(c['outputs'])]
        self.in_doc = False
        cls = 'cell show-doc' if _is_doc(c) else 'cell'
        return f'<div class="{cls}">{"".join(parts)}</div>' if parts else ''

    def attachments(self, c: dict) -> str:
        "Markdown of a cell whose `attachment:` images are saved beside the page (empty when it has none)."
        if not c.get('attachments'): return ''
        text = c['source']
        for name, d in c['attachments'].items():
            mime = next(iter(d)); ext = mime.split('/')[-1].replace('jpeg', 'jpg').replace('svg+xml', 'svg')
            text = text.replace(f'attachment:{name}', self.figure(_text(d[mime]), ext))
        return self.markdown(text)

def _is_doc(c: dict) -> bool:
    "Is `c` a `show_doc` cell (added by nbdev, or written in the notebook)?"
    return c['type'] == 'code' and (c.get('show_doc') or bool(re.search(r'^show_doc\(', c['source'], re.MULTILINE)))

def _directives(source: str) -> tuple[dict, str]:
    "The `#| key: value` lines opening a cell, as a dict, and the code after them."
    dirs, lines = {}, source.splitlines()
    while lines and lines[0].lstrip().startswith('#|'):
        k, _, v = lines.pop(0).lstrip()[2:].partition(':')
        dirs[k.strip()] = v.strip().strip('"\'') if v else 'true'
    return dirs, '\n'.join(lines)

def _merge_streams(outputs: list) -> list:
    "Consecutive stream outputs of the same stream joined into one."
    res = []
    for o in outputs:
        if res and o.get('output_type') == 'stream' and res[-1].get('output_type') == 'stream' and res[-1].get('name') == o.get('name'):
            res[-1] = dict(res[-1], text=_text(res[-1]['text']) + _text(o['text']))
        else: res.append(o)
    return res

# ---------------------------------------------------------------- links, pages, site

def resolve_link(url: str, page: Page, srcs: set) -> str:
    "The href in the built site for `url` written in notebook `page` (nbdev-style `01_attacks.ipynb`, `/attacks.html#pgd`, `attacks.html`)."
    if not url or url.startswith(('#', '//', 'data:')) or _re_scheme.match(url): return url
    path, _, frag = url.partition('#')
    if not path: return url
    here = posixpath.dirname(page.src)
    target = path.lstrip('/') if path.startswith('/') else posixpath.normpath(posixpath.join(here, path))
    if target.endswith(('.ipynb', '.qmd')) or (target.endswith('.md') and target[:-3] + '.ipynb' in srcs): target = html_path(target)
    rel = posixpath.relpath(target, posixpath.dirname(page.href) or '.')
    return rel + (f'#{frag}' if frag else '')

_re_url_attr = re.compile(r'(<(?:a|img|link|source)\b[^>]*?\s(?:href|src))="([^"]*)"', re.IGNORECASE)

def fix_links(body: str, page: Page, srcs: set) -> str:
    "Every link and image source in `body` rewritten to the built site's pages."
    return _re_url_attr.sub(lambda m: f'{m.group(1)}="{html.escape(resolve_link(html.unescape(m.group(2)), page, srcs))}"', body)

def _toc(body: str) -> str:
    "An 'On this page' list of the page's h2 and h3 headings."
    items = [(int(lvl), hid, re.sub(r'<[^>]+>', '', txt)) for lvl, hid, txt in
             re.findall(r'<h([23]) id="([^"]+)"[^>]*>(.*?)</h\1>', body, re.DOTALL)]
    if not items: return ''
    lis = ''.join(f'<li class="toc-h{l}"><a href="#{i}">{t}</a></li>' for l, i, t in items)
    return f'<nav class="toc" aria-label="On this page"><h2 class="toc-title">On this page</h2><ul>{lis}</ul></nav>'

def _nav(pages: list[Page], current: Page) -> str:
    "The sidebar: every page, grouped by section, with links relative to `current`."
    up = posixpath.relpath('.', posixpath.dirname(current.href) or '.')
    def li(p):
        active = ' class="active" aria-current="page"' if p is current else ''
        return f'<li><a href="{posixpath.normpath(posixpath.join(up, p.href))}"{active}>{html.escape(p.title)}</a></li>'
    out, opened = [], False
    for i, p in enumerate(pages):
        if i == 0 or p.section != pages[i-1].section:
            if opened: out.append('</ul></li>')
            opened = bool(p.section)
            if opened: out.append(f'<li class="nav-section"><span>{html.escape(p.section)}</span><ul>')
        out.append(li(p))
    if opened: out.append('</ul></li>')
    return f'<nav class="sidebar" aria-label="Site"><ul>{"".join(out)}</ul></nav>'

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – {site}</title>
<link rel="stylesheet" href="{root}site.css">
</head>
<body>
<header class="topbar"><a class="site-title" href="{root}index.html">{site}</a><span class="site-desc">{site_desc}</span></header>
<div class="layout">
{nav}
<main id="content">
<header class="page-header"><h1 class="title">{title}</h1>{desc}</header>
{body}
</main>
{toc}
</div>
</body>
</html>
"""

def render_page(page: Page, nb: dict, pages: list[Page], cfg) -> tuple[str, dict]:
    "The HTML of one page and its figures {path relative to the page: bytes}."
    r = PageRenderer(page)
    r.ids.update({'content', 'title'})
    r.reserve(nb['cells'])
    body = fix_links('\n'.join(filter(None, map(r.cell, nb['cells']))), page, {p.src for p in pages})
    root = posixpath.relpath('.', posixpath.dirname(page.href) or '.') + '/'
    root = '' if root == './' else root
    desc = f'<p class="description">{r.md.renderInline(page.description)}</p>' if page.description else ''
    text = _PAGE.format(title=html.escape(page.title), site=html.escape(cfg.title), site_desc=html.escape(cfg.description),
                        root=root, nav=_nav(pages, page), desc=desc, body=body, toc=_toc(body))
    return text, r.figures

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --accent:#0b5cad; --bg-code:#f6f8fa; --side:17rem; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); font: 16px/1.6 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
.topbar { display:flex; gap:1rem; align-items:baseline; padding:.6rem 1.2rem; background:#0b5cad; color:#fff; }
.topbar a.site-title { color:#fff; font-weight:700; font-size:1.15rem; } .site-desc { opacity:.85; font-size:.9rem; }
.layout { display:grid; grid-template-columns: var(--side) minmax(0,1fr) 15rem; gap:2rem; max-width:90rem; margin:0 auto; }
nav.sidebar { position:sticky; top:0; align-self:start; max-height:100vh; overflow:auto; padding:1rem .5rem 2rem 1rem; font-size:.92rem; }
nav.sidebar ul { list-style:none; margin:0; padding:0; } nav.sidebar ul ul { padding-left:.8rem; }
nav.sidebar li a { display:block; padding:.18rem .5rem; border-radius:4px; color:var(--fg); }
nav.sidebar li a.active { background:#e7f0fa; color:var(--accent); font-weight:600; }
nav.sidebar .nav-section > span { display:block; margin-top:.8rem; padding:.2rem .5rem; font-weight:700; color:var(--muted); text-transform:capitalize; }
main { min-width:0; padding:1rem 0 4rem; }
h1.title { margin:.4rem 0 .2rem; font-size:2.1rem; } p.description { color:var(--muted); font-size:1.1rem; margin-top:0; }
h2 { border-bottom:1px solid var(--line); padding-bottom:.2rem; margin-top:2.2rem; }
.show-doc h3, .cell-output-markdown h3 { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:1.15rem; margin-top:1.6rem; }
nav.toc { position:sticky; top:0; align-self:start; max-height:100vh; overflow:auto; padding:1rem 1rem 2rem 0; font-size:.85rem; }
nav.toc .toc-title { font-size:.95rem; border:0; margin:0 0 .4rem; } nav.toc ul { list-style:none; padding:0; margin:0; }
nav.toc li.toc-h3 { padding-left:.8rem; } nav.toc a { color:var(--muted); }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:.9em; background:var(--bg-code); padding:.05em .3em; border-radius:3px; }
pre { overflow:auto; padding:.7rem .9rem; border-radius:6px; font-size:.85rem; line-height:1.45; }
pre code { background:none; padding:0; }
pre.highlight { background:var(--bg-code); border:1px solid var(--line); margin:.6rem 0 0; }
.cell-output-markdown > pre.highlight { margin-left:0; background:var(--bg-code); border:1px solid var(--line); border-radius:6px; }
.cell { margin:1rem 0; }
.cell-output pre { background:#fff; border-left:3px solid var(--line); margin:.3rem 0; }
.cell-output-stderr pre { background:#fff8e6; border-left-color:#e0b340; }
.cell-output-error pre { background:#fff0f0; border-left-color:#d33; }
.cell-output-display { overflow-x:auto; margin:.4rem 0; }
img.figure { max-width:100%; height:auto; display:block; margin:.4rem 0; }
table { border-collapse:collapse; margin:.8rem 0; font-size:.9rem; }
th, td { border:1px solid var(--line); padding:.3rem .6rem; text-align:left; vertical-align:top; }
thead th { background:var(--bg-code); }
details.code-fold > summary { cursor:pointer; color:var(--muted); font-size:.85rem; }
blockquote { margin:.8rem 0; padding:.1rem 1rem; border-left:4px solid var(--line); color:var(--muted); }
.callout, [class*="callout-"] { border-left:4px solid var(--accent); background:#f3f8fd; padding:.3rem 1rem; margin:1rem 0; border-radius:4px; }
.math { font-family: ui-monospace, monospace; } math[display="block"] { margin:.8rem 0; }
@media (max-width: 1100px) { .layout { grid-template-columns: var(--side) minmax(0,1fr); } nav.toc { display:none; } }
@media (max-width: 760px) { .layout { display:block; padding:0 1rem; } nav.sidebar { position:static; max-height:none; } }
"""

def site_css(nbs: Path) -> str:
    "The one stylesheet: the site's rules, pygments' colours, then the project's `nbs/styles.css`."
    from pygments.formatters import HtmlFormatter
    extra = (nbs/'styles.css').read_text() if (nbs/'styles.css').exists() else ''
    return _CSS + HtmlFormatter(style='friendly').get_style_defs('.highlight') + '\n' + extra

_re_local_img = re.compile(r'<img\b[^>]*?\ssrc="([^"]+)"', re.IGNORECASE)

def _copy_local_images(body: str, page: Page, nbs: Path, out: Path, generated: set):
    "Copy image files that a page refers to by a relative path (from nbs/) beside it."
    for src in _re_local_img.findall(body):
        src = html.unescape(src)
        if _re_scheme.match(src) or src.startswith(('/', '#')): continue
        rel = posixpath.normpath(posixpath.join(posixpath.dirname(page.href), src))
        if rel in generated: continue
        if (nbs/rel).is_file(): (out/rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(nbs/rel, out/rel)

_re_code_link = re.compile(r'<a href="([^"#:]*)#([^"]+)">(<code>[^<]*</code>)</a>')

def unlink_missing(text: str, page: Page, ids: dict) -> tuple[str, list]:
    "Drop nbdev's links to names with no `show_doc` on their page (private helpers): code stays, the dead anchor goes."
    dropped = []
    def fix(m):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(page.href), html.unescape(m.group(1)) or posixpath.basename(page.href)))
        if target not in ids or html.unescape(m.group(2)) in ids[target]: return m.group(0)
        dropped.append(f'{target}#{m.group(2)}'); return m.group(3)
    return _re_code_link.sub(fix, text), dropped

def write_site(out: Path, pages: list[Page], nbs_done: dict, nbs: Path, cfg, log=print):
    "Write every page, its figures, the stylesheet and any local images into `out` (emptied first)."
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    (out/'site.css').write_text(site_css(nbs))
    rendered = {p.href: render_page(p, nbs_done[p.src], pages, cfg) for p in pages}
    ids = {h: set(re.findall(r'\sid="([^"]+)"', t)) for h, (t, _) in rendered.items()}
    for p in pages:
        text, figs = rendered[p.href]
        text, dropped = unlink_missing(text, p, ids)
        if dropped: log(f"  {p.href}: unlinked {len(dropped)} reference(s) to names with no show_doc: {', '.join(sorted(set(dropped)))}")
        dest = out/p.href
        dest.parent.mkdir(parents=True, exist_ok=True)
        generated = set()
        for name, data in figs.items():
            f = dest.parent/name; f.parent.mkdir(parents=True, exist_ok=True); f.write_bytes(data)
            generated.add(posixpath.normpath(posixpath.join(posixpath.dirname(p.href), name)))
        _copy_local_images(text, p, nbs, out, generated)
        dest.write_text(text)

def build(out='_site_offline', n_workers=2, use_cache=True, keep_going=False, log=print) -> tuple[Path, list]:
    "Build the offline site into `out`; returns (site folder, execution errors)."
    cfg = _cfg()
    out, nbs = (ROOT/out).resolve() if not Path(out).is_absolute() else Path(out), Path(cfg.nbs_path)
    t0 = time.time()
    pages = read_nav(nbs)
    _titles(pages, nbs, cfg)
    log(f"Building {len(pages)} pages from {nbs} into {out}")
    done, errors = execute_all(pages, nbs, cfg, n_workers, use_cache, keep_going, log)
    write_site(out, pages, done, nbs, cfg, log)
    log(f"Site written to {out} in {time.time()-t0:.1f} s; open {out/'index.html'}")
    return out, errors

def main(argv=None):
    "Command line: build the site, print any cell errors, exit 1 if there were some."
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default='_site_offline', help='output folder (default: _site_offline)')
    ap.add_argument('--n-workers', type=int, default=2, help='notebooks executed in parallel (default: 2)')
    ap.add_argument('--no-cache', action='store_true', help='execute every notebook even if .docs_cache/ has it')
    ap.add_argument('--keep-going', action='store_true', help='render cell errors into the pages instead of failing')
    a = ap.parse_args(argv)
    _, errors = build(a.out, a.n_workers, not a.no_cache, a.keep_going)
    for e in errors: print(f"ERROR {e}\n", file=sys.stderr)
    if errors and not a.keep_going:
        print(f"{len(errors)} notebook cell(s) failed; the pages show their tracebacks.", file=sys.stderr)
        return 1
    return 0

if __name__ == '__main__':
    # Run as the module `build_docs`, not `__main__`: the workers find `_work` by module name, and IPython's shell
    # replaces `sys.modules['__main__']` in a worker once it has executed a notebook.
    sys.path.insert(0, str(Path(__file__).parent))
    import build_docs
    sys.exit(build_docs.main())
