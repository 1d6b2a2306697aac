"""The offline docs site, built by `tools/build_docs.py` and opened in a real headless Chromium (Debian's package).

The build runs as users run it (a subprocess, into a temporary folder; executed notebooks come from `.docs_cache/`
when nothing changed). Chromium is installed with apt-get when `/usr/bin/chromium` is missing; if that fails the
test fails. Set `IGDMFAST_SKIP_BROWSER=1` to skip the browser checks on a machine that cannot have Chromium.
Every request the pages make is intercepted: anything that is not a local file fails the test (the site must work
with no network). Screenshots are written to `docs_screenshots/` at the repository root."""
import os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path
from urllib.parse import unquote, urlparse
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT/'docs_screenshots'
CHROMIUM = Path('/usr/bin/chromium')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync']
SKIP_ENV = 'IGDMFAST_SKIP_BROWSER'

sys.path.insert(0, str(ROOT/'tools'))
import build_docs  # noqa: E402

def _say(request, msg):
    "Print past pytest's capture, so CI logs show timings and where the screenshots are."
    cm = request.config.pluginmanager.getplugin('capturemanager')
    with cm.global_and_fixture_disabled(): print(f'\n[test_docs] {msg}', flush=True)

def ensure_chromium(log=print) -> Path:
    "Debian's Chromium, installed with apt-get when missing; fails loudly when that is impossible."
    if CHROMIUM.exists(): return CHROMIUM
    t0 = time.time()
    if os.environ.get(SKIP_ENV) == '1': pytest.skip(f'{CHROMIUM} is missing and {SKIP_ENV}=1')
    if not shutil.which('apt-get'): pytest.fail(f'{CHROMIUM} is missing and there is no apt-get to install it (set {SKIP_ENV}=1 to skip)')
    sudo = [] if os.geteuid() == 0 else ['sudo', '-n']
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    for cmd in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', '--no-install-recommends', 'chromium']):
        r = subprocess.run(sudo + cmd, env=env, capture_output=True, text=True)
        if r.returncode: pytest.fail(f"`{' '.join(sudo + cmd)}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    if not CHROMIUM.exists(): pytest.fail(f'apt-get installed chromium but {CHROMIUM} does not exist')
    log(f'installed Debian chromium with apt-get in {time.time()-t0:.0f} s')
    return CHROMIUM

@pytest.fixture(scope='module')
def site(tmp_path_factory, request):
    "The offline site built by the project command into a temporary folder: (folder, pages)."
    out = tmp_path_factory.mktemp('site')
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--out', str(out)], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, MPLBACKEND='Agg'))
    assert r.returncode == 0, f'tools/build_docs.py failed ({r.returncode}):\n{r.stdout[-5000:]}\n{r.stderr[-8000:]}'
    _say(request, f'site built in {time.time()-t0:.0f} s into {out}:\n{r.stdout.strip()}')
    cfg = build_docs._cfg()
    pages = build_docs.read_nav(Path(cfg.nbs_path))
    build_docs._titles(pages, Path(cfg.nbs_path), cfg)
    return out, pages

@pytest.fixture(scope='module')
def browser(request):
    "A headless Chromium (Debian's, never a downloaded one) with a fresh profile, driven by Playwright."
    exe = ensure_chromium(lambda m: _say(request, m))
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=str(exe), headless=True, args=FLAGS,
                                                    viewport={'width': 1400, 'height': 1000})
        ctx.offline_requests = []
        def route(r):
            if r.request.url.startswith('file://'): return r.continue_()
            ctx.offline_requests.append(r.request.url); r.abort()
        ctx.route('**/*', route)
        yield ctx
        ctx.close()

_JS_REPORT = """() => ({
  h1: [...document.querySelectorAll('main h1')].map(e => e.textContent.trim()),
  h2: [...document.querySelectorAll('main h2')].map(e => e.textContent.trim()),
  h3: [...document.querySelectorAll('main h3')].map(e => [e.id, e.textContent.trim()]),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  assets: [...document.querySelectorAll('link[href]')].map(l => l.href),
  imgs: [...document.querySelectorAll('img')].map(i => ({src: i.currentSrc || i.src, w: i.naturalWidth, h: i.naturalHeight,
                                                         figure: i.classList.contains('figure')})),
  tables: document.querySelectorAll('main table').length,
  highlighted: document.querySelectorAll('pre.highlight span').length,
  sidebar: [...document.querySelectorAll('nav.sidebar a')].map(a => a.getAttribute('href')),
  css: getComputedStyle(document.querySelector('nav.sidebar')).position,
})"""

def visit(ctx, path: Path) -> dict:
    "Open `path` and report its console errors, failed loads, headings, links, images and tables."
    page, problems = ctx.new_page(), []
    page.on('console', lambda m: problems.append(f'console {m.type}: {m.text}') if m.type in ('error', 'warning') else None)
    page.on('pageerror', lambda e: problems.append(f'page error: {e}'))
    page.on('requestfailed', lambda r: problems.append(f'failed to load {r.url}: {r.failure}'))
    page.goto(path.as_uri(), wait_until='load')
    page.wait_for_load_state('networkidle')
    rep = page.evaluate(_JS_REPORT)
    rep.update(page=page, problems=problems, path=path)
    return rep

def _shot(rep, name, request, selector=None):
    "Save a screenshot of the reported page (scrolled to `selector` if given) into docs_screenshots/."
    SHOTS.mkdir(exist_ok=True)
    if selector: rep['page'].locator(selector).first.scroll_into_view_if_needed()
    rep['page'].screenshot(path=str(SHOTS/name))
    _say(request, f'screenshot {SHOTS/name}')

def _page(pages, src): return next(p for p in pages if p.src == src)

def tutorial_pages(pages):
    "The tutorials' pages; the CLI page stands in while there are none yet."
    return [p for p in pages if p.src.startswith('tutorials/')] or [_page(pages, '10_cli.ipynb')]

def test_links_rewritten():
    "nbdev-style links (notebooks, root-absolute doc links, html pages) point at the generated pages, relative to each page."
    api, tut = build_docs.Page('01_attacks.ipynb'), build_docs.Page('tutorials/02_teacher.ipynb')
    srcs = {'01_attacks.ipynb', 'tutorials/02_teacher.ipynb'}
    cases = [(api, '08_evaluate.ipynb#robust_eval', 'evaluate.html#robust_eval'), (api, '/losses.html#igdm_loss', 'losses.html#igdm_loss'),
             (api, 'tutorials/02_teacher.ipynb', 'tutorials/teacher.html'), (tut, '../01_attacks.ipynb', '../attacks.html'),
             (tut, '/attacks.html#pgd', '../attacks.html#pgd'), (tut, 'attacks.html', 'attacks.html'), (tut, '01_quickstart.ipynb', 'quickstart.html'),
             (api, 'https://example.org/x.ipynb', 'https://example.org/x.ipynb'), (api, '#perturb', '#perturb')]
    for page, url, want in cases: assert build_docs.resolve_link(url, page, srcs) == want, (page.src, url)
    body = build_docs.fix_links('<p><a href="06_callback.adversarial.ipynb">cb</a> <img src="img/a.png"></p>', tut, srcs)
    assert 'href="callback.adversarial.html"' in body and 'src="img/a.png"' in body

def test_markdown_rendering():
    "Tables, math (MathML), highlighted code, Quarto's link attributes and fenced divs, and a show_doc source link with no repository."
    r = build_docs.PageRenderer(build_docs.Page('01_attacks.ipynb'))
    out = r.markdown('## A *b*\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n$\\alpha_i^2$ and $$\\sum_i x_i$$\n\n'
                     '```python\ndef f(): return 1\n```\n\n[s](https://e.org){target="_blank"}\n\n::: {.callout-note}\nhi\n:::\n')
    assert '<h2 id="a-b">' in out and '<table>' in out and '<td>1</td>' in out
    assert out.count('<math') == 2 and '<msub>' in out and 'display="block"' in out
    assert '<pre class="highlight"><code class="language-python"><span class="k">def</span>' in out
    assert '{target' not in out and '<div class="callout-note">' in out and '</div>' in out
    assert '[source]' not in r.markdown('[source](/blob/main/igdmfast/attacks.py#LNone){target="_blank" style="float:right"}\n\n### pgd')
    fig = r.output({'output_type': 'display_data', 'data': {'image/png': 'iVBORw0KGgo=', 'text/plain': ['<Figure>']},
                    'metadata': {'image/png': {'width': 300}}})
    assert 'src="attacks_files/figure-1.png"' in fig and 'width="300"' in fig and r.figures

def test_sidebar_order_picks_up_tutorials(tmp_path):
    "Pages follow nbs/sidebar.yml (index, the API notebooks 00..10, then tutorials/*.ipynb); unlisted notebooks still get a page."
    nbs = Path(build_docs._cfg().nbs_path)
    shutil.copy(nbs/'sidebar.yml', tmp_path/'sidebar.yml')
    for f in ['index.ipynb', '10_cli.ipynb', '00_core.ipynb', 'tutorials/02_b.ipynb', 'tutorials/01_a.ipynb', 'extra.ipynb', '_hidden.ipynb']:
        (tmp_path/f).parent.mkdir(exist_ok=True); (tmp_path/f).write_text('{}')
    got = [(p.src, p.section) for p in build_docs.read_nav(tmp_path)]
    assert got == [('index.ipynb', None), ('00_core.ipynb', None), ('10_cli.ipynb', None), ('tutorials/01_a.ipynb', 'Tutorials'),
                   ('tutorials/02_b.ipynb', 'Tutorials'), ('extra.ipynb', 'More')]

def test_every_notebook_has_a_page(site):
    out, pages = site
    nbs = Path(build_docs._cfg().nbs_path)
    missing = [p.relative_to(nbs).as_posix() for p in nbs.rglob('*.ipynb')
               if not any(s[0] in '_.' for s in p.relative_to(nbs).parts) and not (out/build_docs.html_path(p.relative_to(nbs).as_posix())).exists()]
    assert not missing, f'notebooks without a page: {missing}'
    assert pages[0].src == 'index.ipynb' and [p.src for p in pages[1:12]] == sorted(p.src for p in pages[1:12]), [p.src for p in pages]
    assert (out/'site.css').stat().st_size > 1000

def test_index(site, browser, request):
    out, pages = site
    rep = visit(browser, out/'index.html')
    _shot(rep, 'index.png', request)
    assert not rep['problems'], rep['problems']
    assert rep['h1'] == [build_docs._cfg().title]
    assert len(rep['sidebar']) == len(pages), 'the sidebar must link every page'
    assert rep['tables'] >= 1, 'the README table (and the training tables) must render as HTML tables'
    assert rep['highlighted'] > 10, 'code must be highlighted'
    assert rep['css'] == 'sticky', 'the local stylesheet did not load'
    assert not browser.offline_requests, f'the page asked the network for {browser.offline_requests}'

def test_api_page(site, browser, request):
    out, pages = site
    rep = visit(browser, out/'attacks.html')
    _shot(rep, 'attacks.png', request)
    assert not rep['problems'], rep['problems']
    assert rep['h1'] == ['attacks']
    ids = {i for i, _ in rep['h3']}
    for name in ('perturb', 'pgd', 'fgsm', 'cw_linf', 'autoattack'): assert name in ids, f'no show_doc heading for {name}: {sorted(ids)}'
    assert rep['highlighted'] > 10
    active = rep['page'].locator('nav.sidebar a.active').inner_text()
    assert active == 'attacks'

def test_plots_load(site, browser, request):
    out, pages = site
    with_figs = [p for p in pages if '<img class="figure"' in (out/p.href).read_text()]
    assert with_figs, 'no page shows a plot: matplotlib figures must be rendered as images'
    first = None
    for p in with_figs:
        rep = visit(browser, out/p.href)
        figs = [i for i in rep['imgs'] if i['figure']]
        assert figs and all(i['w'] > 50 and i['h'] > 50 for i in figs), f'{p.href}: a plot did not load: {figs}'
        assert not rep['problems'], (p.href, rep['problems'])
        first = first or rep
    api = next((p for p in with_figs if not p.src.startswith(('index', 'tutorials/'))), None)
    assert api is not None, 'no API page shows a plot'
    _shot(first, 'plot.png', request, 'img.figure')

def test_tutorial_page(site, browser, request):
    out, pages = site
    for i, p in enumerate(tutorial_pages(pages)):
        rep = visit(browser, out/p.href)
        if i == 0: _shot(rep, 'tutorial.png', request)
        assert not rep['problems'], (p.href, rep['problems'])
        assert rep['h1'] == [p.title], (p.href, rep['h1'])
        assert len(rep['sidebar']) == len(pages)
        assert all(i['w'] > 0 for i in rep['imgs']), (p.href, rep['imgs'])

def _ids(f: Path, cache={}) -> set:
    "The element ids in the HTML file `f`."
    if f not in cache: cache[f] = set(re.findall(r'\sid="([^"]+)"', f.read_text()))
    return cache[f]

def test_every_link_resolves(site, browser, request):
    "Every page loads cleanly, and every link, stylesheet and image on it that is local exists (anchors included)."
    out, pages = site
    broken, n = [], 0
    for p in pages:
        rep = visit(browser, out/p.href)
        broken += [f'{p.href}: {x}' for x in rep['problems']]
        broken += [f'{p.href}: image {i["src"]} did not load' for i in rep['imgs'] if i['w'] == 0]
        for url in rep['links'] + rep['assets'] + [i['src'] for i in rep['imgs']]:
            u = urlparse(url)
            if u.scheme != 'file': continue
            n += 1
            f = Path(unquote(u.path))
            if not f.is_file(): broken.append(f'{p.href}: {url} -> missing file'); continue
            if out.resolve() not in f.resolve().parents: broken.append(f'{p.href}: {url} -> outside the site')
            elif u.fragment and f.suffix == '.html' and unquote(u.fragment) not in _ids(f): broken.append(f'{p.href}: {url} -> no such anchor')
        rep['page'].close()
    _say(request, f'checked {n} local links on {len(pages)} pages')
    assert not broken, '\n'.join(broken)
    assert not browser.offline_requests, f'pages asked the network for {browser.offline_requests}'
    assert n > len(pages) ** 2, 'too few links: the sidebar should link every page from every page'


def test_no_machine_paths_or_stray_warnings_in_the_pages(site):
    "The rendered pages show nothing of the machine that built them (issue #14): no virtualenv path, no checkout path, no warning."
    out, _ = site
    for page in sorted(Path(out).rglob('*.html')):
        text = page.read_text(errors='replace')
        for bad in ('site-packages', str(ROOT), 'FutureWarning', 'DeprecationWarning'):
            assert bad not in text, f"{page.relative_to(out)} shows {bad!r}"
