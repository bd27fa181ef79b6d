/* The attention explorer of "Attention, Annotated": plain JavaScript, no libraries, nothing fetched.
 *
 * Data files are JSON wrapped in one call, `attentionExplorerData.push({...})`, and loaded with <script>
 * tags, because a page opened from file:// may not fetch() files next to it. Each pushed object is
 *
 *   {model: "name", command: "how it was made", examples: [
 *      {title: "...", attention: [
 *         {name: "self-attention", queries: [tokens], keys: [tokens],
 *          layers: [L][H][Tq][Tk] weights, rollout: [Tq][Tk] or null}]}]}
 *
 * A user's own export (the same object as JSON) can be opened with the file picker.
 */
(function () {
  "use strict";
  window.attentionExplorerData = window.attentionExplorerData || [];

  const SVG = "http://www.w3.org/2000/svg";
  const state = {model: 0, example: 0, attention: 0, layer: 0, head: "mean", pinned: null, hover: null};
  let root = null;

  function el(tag, attrs, parent, text) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function shown(token) {  // whitespace made visible, so every token has a glyph to hover
    return String(token).replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5").replace(/ /g, "\u2423") || "\u2205";
  }

  function current() {
    const model = window.attentionExplorerData[state.model];
    const example = model.examples[state.example];
    return {model, example, attention: example.attention[state.attention]};
  }

  function headMean(layer) {  // (H, Tq, Tk) -> (Tq, Tk)
    return layer[0].map((row, i) => row.map((_, j) => layer.reduce((s, h) => s + h[i][j], 0) / layer.length));
  }

  function matrix() {  // the (Tq, Tk) weights the controls select
    const {attention} = current();
    if (state.head === "rollout") return attention.rollout;
    const layer = attention.layers[state.layer];
    return state.head === "mean" ? headMean(layer) : layer[Number(state.head)];
  }

  // -- controls -----------------------------------------------------------------------------------------
  function options(select, items, value) {
    select.textContent = "";
    items.forEach(([v, label]) => el("option", {value: String(v)}, select, label));
    select.value = String(value);
  }

  function buildControls(bar) {
    const make = (label, key) => {
      const wrap = el("label", {class: "ae-control"}, bar, label + " ");
      const select = el("select", {"data-control": key}, wrap);
      select.addEventListener("change", () => {
        state[key] = key === "head" ? select.value : Number(select.value);
        if (key === "model") { state.example = 0; state.attention = 0; }
        if (key === "model" || key === "example") state.attention = Math.min(state.attention,
          current().example.attention.length - 1);
        const layers = current().attention.layers.length;
        state.layer = Math.min(state.layer, layers - 1);
        if (state.head === "rollout" && !current().attention.rollout) state.head = "mean";
        state.pinned = null; state.hover = null;
        render();
      });
      return select;
    };
    return {model: make("model", "model"), example: make("input", "example"), attention: make("attention", "attention"),
            layer: make("layer", "layer"), head: make("head", "head")};
  }

  function syncControls(controls) {
    const {model, example, attention} = current();
    options(controls.model, window.attentionExplorerData.map((m, i) => [i, m.model]), state.model);
    options(controls.example, model.examples.map((e, i) => [i, e.title]), state.example);
    options(controls.attention, example.attention.map((a, i) => [i, a.name]), state.attention);
    options(controls.layer, attention.layers.map((_, i) => [i, "layer " + i]), state.layer);
    const heads = attention.layers[state.layer].map((_, h) => [h, "head " + h]);
    heads.push(["mean", "mean of heads"]);
    if (attention.rollout) heads.push(["rollout", "rollout (all layers)"]);
    options(controls.head, heads, state.head);
    controls.layer.disabled = state.head === "rollout";
  }

  // -- the two views ------------------------------------------------------------------------------------
  function focus() { return state.pinned || state.hover; }

  function drawLines(svg, weights, queries, keys) {
    const rowH = 18, width = 420, top = 24;
    const height = top + Math.max(queries.length, keys.length) * rowH + 8;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("height", height);
    el("svg:text", {x: 70, y: 14, "text-anchor": "end", class: "ae-head"}, svg, "from (query)");
    el("svg:text", {x: width - 70, y: 14, class: "ae-head"}, svg, "to (key)");
    const f = focus();
    const lines = el("svg:g", {}, svg);
    weights.forEach((row, i) => row.forEach((w, j) => {
      if (w < 0.01) return;
      const active = !f || (f.side === "query" && f.index === i) || (f.side === "key" && f.index === j);
      el("svg:line", {x1: 80, y1: top + i * rowH + 5, x2: width - 80, y2: top + j * rowH + 5,
                      "stroke-width": 1 + 4 * w, "stroke-opacity": active ? Math.min(1, 0.15 + w) : 0.03,
                      class: active && f ? "ae-line ae-active" : "ae-line", "data-i": i, "data-j": j}, lines);
    }));
    const column = (tokens, side, x, anchor) => tokens.forEach((t, i) => {
      const selected = f && f.side === side && f.index === i;
      let weight = null;
      if (f && f.side !== side) weight = side === "key" ? weights[f.index][i] : weights[i][f.index];
      const label = el("svg:text", {x, y: top + i * rowH + 9, "text-anchor": anchor, "data-side": side,
                                     "data-index": i, class: "ae-token" + (selected ? " ae-selected" : "")}, svg,
                       shown(t));
      if (weight !== null) label.setAttribute("fill-opacity", String(0.25 + 0.75 * Math.min(1, weight * 2)));
      label.addEventListener("mouseenter", () => { state.hover = {side, index: i}; render(); });
      label.addEventListener("mouseleave", () => { state.hover = null; render(); });
      label.addEventListener("click", () => {
        state.pinned = selected && state.pinned ? null : {side, index: i}; render();
      });
    });
    column(queries, "query", 70, "end");
    column(keys, "key", width - 70, "start");
  }

  function drawHeatmap(svg, weights, queries, keys) {
    const cell = Math.max(6, Math.min(16, Math.floor(360 / Math.max(queries.length, keys.length)))), pad = 4;
    const width = pad + keys.length * cell + pad, height = pad + queries.length * cell + pad;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    const max = Math.max(1e-9, ...weights.flat());
    const f = focus();
    weights.forEach((row, i) => row.forEach((w, j) => {
      const lit = f && ((f.side === "query" && f.index === i) || (f.side === "key" && f.index === j));
      const shade = Math.round(255 * (1 - w / max));
      const rect = el("svg:rect", {x: pad + j * cell, y: pad + i * cell, width: cell, height: cell,
                                    fill: `rgb(${shade},${shade},255)`, class: lit ? "ae-cell ae-lit" : "ae-cell"}, svg);
      el("svg:title", {}, rect, `${shown(queries[i])} \u2192 ${shown(keys[j])}: ${w.toFixed(3)}`);
      rect.addEventListener("mouseenter", () => { state.hover = {side: "query", index: i}; render(); });
    }));
  }

  function describe(weights, queries, keys) {
    const f = focus();
    if (!f) return "Hover a token (click to pin it) to see where it looks and what looks at it.";
    if (f.side === "query") {
      const row = weights[f.index];
      const order = row.map((w, j) => [w, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
      return `query ${f.index} "${shown(queries[f.index])}" attends most to ` +
        order.map(([w, j]) => `"${shown(keys[j])}"@${j} (${w.toFixed(2)})`).join(", ");
    }
    const column = weights.map((row, i) => [row[f.index], i]).sort((a, b) => b[0] - a[0]).slice(0, 3);
    return `key ${f.index} "${shown(keys[f.index])}" is attended most by ` +
      column.map(([w, i]) => `"${shown(queries[i])}"@${i} (${w.toFixed(2)})`).join(", ");
  }

  let controls = null, linesSvg = null, heatSvg = null, info = null, source = null;

  function render() {
    if (!window.attentionExplorerData.length) {
      info.textContent = "No attention data loaded: open an exported JSON file with the picker above.";
      return;
    }
    syncControls(controls);
    const {model, attention} = current();
    const weights = matrix();
    linesSvg.textContent = "";
    heatSvg.textContent = "";
    drawLines(linesSvg, weights, attention.queries, attention.keys);
    drawHeatmap(heatSvg, weights, attention.queries, attention.keys);
    info.textContent = describe(weights, attention.queries, attention.keys);
    source.textContent = model.command ? "made by: " + model.command : "";
    root.dataset.rendered = String(Number(root.dataset.rendered || 0) + 1);
  }

  function mount(container) {
    root = container;
    root.classList.add("attention-explorer");
    const bar = el("div", {class: "ae-bar"}, root);
    controls = buildControls(bar);
    const picker = el("label", {class: "ae-control"}, bar, "open JSON ");
    const input = el("input", {type: "file", accept: ".json,application/json"}, picker);
    input.addEventListener("change", () => {
      const file = input.files[0];
      if (!file) return;
      const reader = new FileReader();
      reader.onload = () => {
        try {
          window.attentionExplorerData.push(JSON.parse(reader.result));
          state.model = window.attentionExplorerData.length - 1; state.example = 0; state.attention = 0;
          state.layer = 0; state.head = "mean"; render();
        } catch (error) { info.textContent = "could not read " + file.name + ": " + error; }
      };
      reader.readAsText(file);
    });
    info = el("p", {class: "ae-info", "aria-live": "polite"}, root);
    const views = el("div", {class: "ae-views"}, root);
    linesSvg = el("svg:svg", {class: "ae-lines", width: "420"}, views);
    heatSvg = el("svg:svg", {class: "ae-heatmap"}, views);
    source = el("p", {class: "ae-source"}, root);
    render();
  }

  // A small API, for the docs' browser test and for readers who want to drive it from the console.
  window.attentionExplorer = {
    state, render,
    select(changes) { Object.assign(state, changes, {pinned: null, hover: null}); render(); },
    weights: () => matrix(),
  };

  document.addEventListener("DOMContentLoaded", () => {
    // A data attribute, not an id: Sphinx gives the page's section the id "attention-explorer" already.
    const container = document.querySelector("[data-attention-explorer]");
    if (container) mount(container);
  });
})();
