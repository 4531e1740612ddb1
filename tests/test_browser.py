"""The built book as a reader meets it: every page opened in a real browser.

Drives Debian's own ``chromium`` headless through Playwright (``executable_path``: Playwright downloads
no browser here) over the smoke book that ``make test`` builds (``_build/smoke/_build/html``; another
build with ``PRUNING_BOOK_HTML=DIR``). The book is served from a local HTTP server on 127.0.0.1; every
request for any other host is recorded and aborted, so a page that needs the network (MathJax from a
CDN, a web font) fails here as it would for a reader offline.

Each page is loaded once (``visits``); the tests then check what was seen:

- no console error and no uncaught exception;
- no progress-bar output (``%|``) in the visible text;
- no request leaves the page, and none fails (an HTTP error or a network failure);
- math is typeset: no raw ``\\(`` or ``\\[`` in the visible text;
- every image in a page's content has a non-zero natural size;
- every internal link resolves (the file, and the anchor when it has one);
- the search page finds a claim by a word of its text;
- on the verdicts page, every verdict is fully visible in a 1280 px wide window.

``make browser`` runs this after ``make smoke smoke-html`` (it is left out of ``make unit``: it needs the
built book). Without ``chromium`` or Playwright it skips, saying what to install; ``.ci/run`` installs
``chromium`` with apt when it is missing.
"""
from __future__ import annotations

import csv
import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
BOOK = Path(os.environ.get("PRUNING_BOOK_HTML", ROOT / "_build" / "smoke" / "_build" / "html"))
WIDTH, HEIGHT = 1280, 900
TIMEOUT_MS = 30_000
PROGRESS = re.compile(r"\d+%\|")
RAW_MATH = re.compile(r"\\\(|\\\[")


def chromium_path() -> str | None:
    """Debian's chromium (or ``$CHROMIUM``)."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name) or (Path(name).is_file() and name)):
            return str(found)
    return None


def book_pages(book: Path) -> list[Path]:
    """Every HTML page of the book (theme and build folders left out)."""
    return sorted(p for p in book.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(book).parts[:-1]))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="session")
def site():
    if not (BOOK / "index.html").exists():
        pytest.skip(f"no built book in {BOOK}: run `make smoke smoke-html` first (or set "
                    f"PRUNING_BOOK_HTML to a built book's _build/html)")
    handler = functools.partial(_Quiet, directory=str(BOOK))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -e '.[test]'")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium: install Debian's browser (apt-get install chromium; .ci/run does "
                    "this when apt is available), or set CHROMIUM to a Chromium executable")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def context(browser, site):
    """A 1280 px browser context in which every request for another host is recorded and aborted."""
    ctx = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    ctx.outside = []  # type: ignore[attr-defined]

    def route(r):
        url = r.request.url
        if url.startswith(site) or not url.startswith(("http:", "https:", "ws:", "wss:")):
            r.continue_()
        else:
            ctx.outside.append(url)  # type: ignore[attr-defined]
            r.abort()

    ctx.route("**/*", route)
    yield ctx
    ctx.close()


WAIT_FOR_PAGE = """async () => {
    // MathJax 3 typesets after its script loads: wait for it (a MathJax that never loads never typesets)
    if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
        await window.MathJax.startup.promise;
    }
    await document.fonts.ready;
    const imgs = [...document.querySelectorAll('main img, article img, .bd-article img')];
    return await Promise.all(imgs.map(async (img) => {
        img.loading = 'eager';
        try { await img.decode(); } catch (e) {}
        return {src: img.currentSrc || img.src, w: img.naturalWidth, h: img.naturalHeight};
    }));
}"""

LINKS = """() => [...document.querySelectorAll('a[href]')].map(a => a.href)"""


@pytest.fixture(scope="session")
def visits(context, site):
    """Load every page once; what each showed and did, by its path relative to the book."""
    seen = {}
    for path in book_pages(BOOK):
        rel = path.relative_to(BOOK).as_posix()
        page = context.new_page()
        record = {"console": [], "errors": [], "failed": [], "bad_status": []}
        page.on("console", lambda m, r=record: m.type == "error" and r["console"].append(m.text))
        page.on("pageerror", lambda e, r=record: r["errors"].append(str(e)))
        page.on("requestfailed", lambda q, r=record: r["failed"].append(f"{q.url} ({q.failure})"))
        page.on("response", lambda s, r=record: s.status >= 400 and r["bad_status"].append(
            f"{s.url} ({s.status})"))
        before = len(context.outside)
        page.goto(site + rel, wait_until="networkidle", timeout=TIMEOUT_MS)
        record["images"] = page.evaluate(WAIT_FOR_PAGE)
        record["text"] = page.evaluate("() => document.body.innerText")
        record["links"] = page.evaluate(LINKS)
        record["math"] = page.evaluate("() => document.querySelectorAll('.math').length")
        record["typeset"] = page.evaluate("() => document.querySelectorAll('mjx-container').length")
        record["outside"] = context.outside[before:]
        page.close()
        seen[rel] = record
    assert seen, f"no pages in {BOOK}"
    return seen


def chapter_pages(visits) -> list[str]:
    return [rel for rel in visits if rel.startswith("book/")]


def test_pages_load_without_console_errors(visits):
    bad = {rel: v["console"] + v["errors"] for rel, v in visits.items() if v["console"] or v["errors"]}
    assert not bad, f"console errors: {bad}"


def test_no_progress_bars_on_pages(visits):
    bad = {rel: PROGRESS.findall(v["text"])[:3] for rel, v in visits.items() if PROGRESS.search(v["text"])}
    assert not bad, f"progress-bar output in the visible text: {bad}"


def test_no_request_leaves_the_page(visits):
    bad = {rel: sorted(set(v["outside"])) for rel, v in visits.items() if v["outside"]}
    assert not bad, f"requests to other hosts (the book must work offline): {bad}"


def test_no_request_fails(visits):
    bad = {rel: v["failed"] + v["bad_status"] for rel, v in visits.items()
           if v["bad_status"] or [f for f in v["failed"] if not any(o in f for o in v["outside"])]}
    assert not bad, f"failed requests: {bad}"


def test_math_is_typeset(visits):
    raw = {rel: [m.start() for m in RAW_MATH.finditer(v["text"])][:3] for rel, v in visits.items()
           if RAW_MATH.search(v["text"])}
    assert not raw, f"raw LaTeX delimiters in the visible text (MathJax did not typeset): {raw}"
    untyped = [rel for rel, v in visits.items() if v["math"] and not v["typeset"]]
    assert not untyped, f"pages with math but no typeset formula: {untyped}"
    assert any(v["typeset"] for v in visits.values()), "no page has typeset math: is MathJax running?"


def test_every_image_has_a_size(visits):
    bad = {rel: [i["src"][:80] for i in v["images"] if not (i["w"] and i["h"])]
           for rel, v in visits.items()}
    bad = {rel: srcs for rel, srcs in bad.items() if srcs}
    assert not bad, f"images without a natural size (not loaded): {bad}"
    assert sum(len(visits[rel]["images"]) for rel in chapter_pages(visits)) > 0, "no figure found"


@functools.lru_cache(maxsize=None)
def _ids(path: Path) -> frozenset[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(re.findall(r'\b(?:id|name)="([^"]+)"', text))


def test_internal_links_resolve(visits, site):
    broken = []
    for rel, v in visits.items():
        for href in v["links"]:
            if not href.startswith(site):
                continue
            parts = urlsplit(href)
            target = BOOK / unquote(parts.path[len(urlsplit(site).path):])
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{rel} -> {href} (no such file)")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _ids(target):
                broken.append(f"{rel} -> {href} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(sorted(set(broken)))


STOP = {"which", "their", "there", "about", "after", "before", "while", "under", "other", "these",
        "those", "with", "than", "that", "this", "when", "where", "same", "without", "within"}


def a_claim() -> tuple[str, str]:
    """(word, chapter) for the first claim of the smoke run's claims tables: its longest plain word."""
    for csv_path in sorted((ROOT / "results" / "claims" / "smoke").glob("*.csv")):
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                words = [w for w in re.findall(r"[A-Za-z]{6,}", row.get("claim", ""))
                         if w.lower() not in STOP]
                if words:
                    return max(words, key=len), row.get("chapter") or csv_path.stem
    pytest.skip("no claims table in results/claims/smoke/: run `make smoke` first")


def test_search_finds_a_claim(context, site):
    word, chapter = a_claim()
    page = context.new_page()
    page.goto(f"{site}search.html?q={word}", wait_until="networkidle", timeout=TIMEOUT_MS)
    page.wait_for_function(  # Sphinx's search says "Search finished, found N pages" or "did not match"
        "() => /found|did not match/i.test((document.querySelector('#search-results') || {}).innerText"
        " || '')", timeout=TIMEOUT_MS)
    hits = page.eval_on_selector_all("#search-results ul.search li a", "as => as.map(a => a.href)")
    page.close()
    assert any(chapter in h for h in hits), (
        f"searching for {word!r} (a word of a claim of {chapter}) found {hits}")


VERDICT_CLIPPING = """() => {
    // every element that shows a verdict: chips, and the cells of a table column headed "verdict"
    const els = [...document.querySelectorAll('[data-verdict]')];
    for (const table of document.querySelectorAll('table')) {
        const heads = [...table.querySelectorAll('thead th')].map(th => th.innerText.trim().toLowerCase());
        const col = heads.indexOf('verdict');
        if (col < 0) continue;
        for (const tr of table.querySelectorAll('tbody tr')) {
            const cell = tr.children[col];
            if (cell) els.push(cell);
        }
    }
    const clipped = [];
    for (const el of els) {
        const box = el.getBoundingClientRect();
        if (box.width === 0 && box.height === 0) continue;  // inside a closed dropdown
        let why = null;
        if (el.scrollWidth > el.clientWidth + 1) why = 'text wider than its box';
        if (box.right > window.innerWidth + 1) why = 'beyond the window';
        for (let a = el.parentElement; a && !why; a = a.parentElement) {
            const s = getComputedStyle(a);
            if (s.overflowX !== 'visible' || s.overflow !== 'visible') {
                const r = a.getBoundingClientRect();
                if (box.right > r.right + 1 || box.left < r.left - 1)
                    why = 'cut by ' + a.tagName + '.' + a.className;
            }
        }
        if (why) clipped.push(el.innerText.trim() + ': ' + why);
    }
    return {n: els.length, clipped};
}"""


def test_verdicts_fully_visible_at_1280px(context, site):
    rel = "book/chapters/99_verdicts.html"
    if not (BOOK / rel).exists():
        pytest.fail(f"no verdicts page {rel} in {BOOK}")
    page = context.new_page()
    page.goto(site + rel, wait_until="networkidle", timeout=TIMEOUT_MS)
    result = page.evaluate(VERDICT_CLIPPING)
    page.close()
    assert result["n"] > 0, "no verdict found on the verdicts page"
    assert not result["clipped"], f"verdicts cut at a {WIDTH} px window: {result['clipped']}"

