"""The built docs, opened in a real (headless) browser with the network switched off.

* No page references a script or stylesheet on the internet (read from the HTML; no browser needed).
* Every page with math shows typeset math (MathJax's ``mjx-container`` elements) and no raw ``\\(``/``\\[``
  left in its text, with the browser's network emulated offline: the math is served from the build.
* Equation numbers sit at the right of their equation, on the same line.
* No page reports a JavaScript error.
* Screenshots of the walk-through, one mechanism page and the catalogue are written to
  ``docs/_build/screenshots/`` for a person to look at.

The browser is Chromium (Debian's ``chromium`` package, which ``.ci/run`` installs when it is absent),
driven through the DevTools protocol over a pipe (``tests/browser.py``). Without it these tests skip.
"""
import pathlib
import re

import pytest

from tests.browser import Browser, find_chromium

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "_build" / "screenshots"
CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package `chromium`; "
                                                           ".ci/run installs it when absent)")
REMOTE = re.compile(r"<(?:script|link)\b[^>]*(?:src|href)=[\"'](?:https?:)?//", re.IGNORECASE)
WAIT_FOR_MATH = """
(async () => {
  if (!window.MathJax || !MathJax.startup) { return {loaded: false}; }
  await MathJax.startup.promise;
  const text = document.querySelector('div[itemprop=articleBody], div.document, body').innerText;
  return {loaded: true, typeset: document.querySelectorAll('mjx-container').length,
          raw: (text.match(/\\\\[\\(\\[]/g) || []).length};
})()
"""


def html_pages(html):
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.parts and "_modules" not in p.parts)


@pytest.fixture(scope="module")
def site(built_docs):
    result, html = built_docs
    if result.returncode != 0:
        pytest.fail(f"the docs build failed:\n{result.stderr[-3000:]}")
    return html


@pytest.mark.slow
def test_no_page_loads_a_script_or_stylesheet_from_the_internet(site):
    offenders = {}
    for page in html_pages(site):
        found = REMOTE.findall(page.read_text(encoding="utf-8"))
        if found:
            offenders[str(page.relative_to(site))] = found
    assert not offenders, f"pages that would fetch code or styles from the network: {offenders}"
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists(), "MathJax is not served from the build"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian package `chromium`; .ci/run installs it when absent)")
    with Browser(CHROMIUM) as chrome:
        chrome.send("Network.enable", session=True)
        chrome.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                         "uploadThroughput": -1}, session=True)
        yield chrome


@pytest.mark.slow
@needs_browser
def test_every_page_with_math_typesets_it_offline(site, browser):
    math_pages = [p for p in html_pages(site) if 'class="math' in p.read_text(encoding="utf-8")]
    assert len(math_pages) >= 10, f"only {len(math_pages)} pages with math were found in {site}"
    problems = {}
    for page in math_pages:
        browser.open(page.as_uri())
        state = browser.evaluate(WAIT_FOR_MATH)
        errors = browser.errors()
        name = str(page.relative_to(site))
        if not state["loaded"]:
            problems[name] = "MathJax did not load"
        elif state["typeset"] == 0 or state["raw"] > 0:
            problems[name] = f"{state['typeset']} typeset formulas, {state['raw']} raw \\( or \\[ left"
        elif errors:
            problems[name] = f"JavaScript errors: {errors}"
    assert not problems, f"pages whose math did not render offline: {problems}"


@pytest.mark.slow
@needs_browser
def test_equation_numbers_sit_at_the_right_of_their_equation(site, browser):
    browser.open((site / "transformer.html").as_uri())
    boxes = browser.evaluate("""
    (async () => {
      await MathJax.startup.promise;
      return Array.from(document.querySelectorAll('div.math')).filter(d => d.querySelector('.eqno')).map(d => {
        const n = d.querySelector('.eqno').getBoundingClientRect();
        const m = d.querySelector('mjx-container').getBoundingClientRect();
        return {number_left: n.left, math_right: m.right, number_mid: (n.top + n.bottom) / 2,
                math_top: m.top, math_bottom: m.bottom};
      });
    })()
    """)
    assert len(boxes) >= 10, f"expected numbered equations on the walk-through, found {len(boxes)}"
    for box in boxes:
        assert box["number_left"] >= box["math_right"] - 1, f"an equation number is not right of its math: {box}"
        assert box["math_top"] - 1 <= box["number_mid"] <= box["math_bottom"] + 1, (
            f"an equation number is not on its equation's line: {box}")


@pytest.mark.slow
@needs_browser
def test_screenshots_for_review(site, browser):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, page in (("transformer", "transformer.html"),
                       ("mechanism_grouped_query_attention", "mechanisms/grouped_query_attention.html"),
                       ("catalogue", "mechanisms/index.html")):
        browser.open((site / page).as_uri())
        browser.evaluate("MathJax.startup.promise.then(() => true)")
        path = SCREENSHOTS / f"{name}.png"
        browser.screenshot(path)
        assert path.stat().st_size > 10_000, f"{path} looks empty"


EXPLORER_SCRIPT = """
(() => {
  const root = document.querySelector('[data-attention-explorer]');
  const data = window.attentionExplorerData || [];
  const box = root.getBoundingClientRect();
  const result = {models: data.map(m => m.model), tokens: root.querySelectorAll('.ae-token').length,
                  top: box.top + window.scrollY, intro: document.querySelector('h1').getBoundingClientRect().bottom};
  const before = Number(root.dataset.rendered);
  const head = root.querySelector('select[data-control=head]');
  head.value = '0';
  head.dispatchEvent(new Event('change'));
  result.rerendered = Number(root.dataset.rendered) > before;
  const expected = data[0].examples[0].attention[0].layers[0][0];
  result.shows_head0 = JSON.stringify(attentionExplorer.weights()) === JSON.stringify(expected);
  const token = root.querySelector('.ae-token[data-side=query][data-index="3"]');
  const quiet = root.querySelectorAll('.ae-line.ae-active').length;
  token.dispatchEvent(new MouseEvent('mouseenter'));
  result.active_before_hover = quiet;
  result.active_after_hover = root.querySelectorAll('.ae-line.ae-active').length;
  result.info = root.querySelector('.ae-info').textContent;
  const model = root.querySelector('select[data-control=model]');
  const translator = data.findIndex(m => m.model.startsWith('date translator'));
  model.value = String(translator);
  model.dispatchEvent(new Event('change'));
  const cross = data[translator].examples[0].attention[0];
  result.cross_shape = [cross.queries.length, cross.keys.length];
  result.cross_drawn = [root.querySelectorAll('.ae-token[data-side=query]').length,
                        root.querySelectorAll('.ae-token[data-side=key]').length];
  result.cells = root.querySelectorAll('.ae-cell').length;
  return result;
})()
"""


@pytest.mark.slow
@needs_browser
def test_attention_explorer_loads_its_data_and_responds(site, browser):
    browser.open((site / "explorer.html").as_uri())
    state = browser.evaluate(EXPLORER_SCRIPT)
    assert len(state["models"]) == 3, f"the explorer loaded {state['models']}; expected the char LM, the translator, the ViT"
    assert state["cross_shape"][0] != state["cross_shape"][1], "the translator's cross-attention should be rectangular"
    assert state["tokens"] > 0, "no tokens drawn"
    assert state["top"] < state["intro"] + 600, f"the explorer is not near the top of its page: {state}"
    assert state["rerendered"] and state["shows_head0"], f"choosing head 0 did not show head 0: {state}"
    assert state["active_before_hover"] == 0 and state["active_after_hover"] > 0, f"hover changed nothing: {state}"
    assert "query 3" in state["info"], state["info"]
    assert state["cross_drawn"] == state["cross_shape"], f"cross-attention drawn with the wrong tokens: {state}"
    assert state["cells"] == state["cross_shape"][0] * state["cross_shape"][1]
    assert not browser.errors(), f"JavaScript errors on the explorer: {browser.errors()}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.evaluate("""(() => { const t = document.querySelector('.ae-token[data-side=query][data-index="2"]');
                          t.dispatchEvent(new MouseEvent('click')); return true; })()""")
    browser.screenshot(SCREENSHOTS / "explorer.png")
