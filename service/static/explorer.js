// FaCT explanation explorer: a plain client of the service's JSON API (no framework, no build step).
// GET /model, GET /samples, POST /explain (multipart), GET /concepts/{layer}/{id}.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // el("tag.class", {attr: value, onclick: fn}, child, "text", ...) — never innerHTML with data.
  function el(spec, attrs, ...children) {
    const [tag, ...classes] = spec.split(".");
    const node = document.createElement(tag);
    if (classes.length) node.className = classes.join(" ");
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  const fmt = (x, digits = 3) => {
    if (!Number.isFinite(x)) return String(x);
    const s = Math.abs(x) >= 1000 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toFixed(digits);
    return x > 0 ? `+${s}` : s;
  };
  const plain = (x, digits = 3) => fmt(x, digits).replace(/^\+/, "");
  const pct = (x) => `${(100 * x).toFixed(1)}%`;
  const sci = (x) => (x === 0 ? "0" : x.toExponential(1).replace("e+", "e"));
  const png = (b64) => `data:image/png;base64,${b64}`;
  const conceptName = (c) => `${c.layer} #${c.id}`;

  const state = {
    model: null,
    file: null, // the image Blob being explained
    fileName: "",
    imageURL: null,
    target: "",
    contrast: "",
    topK: 5,
    kind: "bcos",
    showMaps: true,
    result: null,
    request: 0, // newest request id: older responses are ignored
    awaitingFirst: false, // a new image's first result is still to be shown (Performance API measure)
    cardOpener: null,
  };

  // ------------------------------------------------------------------ messages
  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }
  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }
  function setStatus(text) {
    $("status").textContent = text;
  }

  // The API answers errors as {"error", "reason", "status"}; anything else is described as is.
  async function apiError(response) {
    let detail = "";
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") detail = body.error;
      else detail = JSON.stringify(body).slice(0, 300);
    } catch (_) {
      detail = response.statusText || "no details";
    }
    const hints = { 413: " (the file is larger than the service accepts)", 504: " (the service took too long)" };
    return `The service refused the request — HTTP ${response.status}${hints[response.status] || ""}: ${detail}`;
  }

  async function getJSON(url) {
    let response;
    try {
      response = await fetch(url, { headers: { Accept: "application/json" } });
    } catch (err) {
      throw new Error(`Could not reach the service (${url}): ${err.message}`);
    }
    if (!response.ok) throw new Error(await apiError(response));
    return response.json();
  }

  // ------------------------------------------------------------------ start-up
  async function loadModel() {
    try {
      const model = await getJSON("/model");
      state.model = model;
      const acc = model.evaluation && model.evaluation.fact_accuracy;
      $("model-info").textContent =
        `${model.name}:${model.version} · ${model.architecture} · ${model.classes.length} classes` +
        (acc !== undefined && acc !== null ? ` · FaCT accuracy ${pct(acc)}` : "") +
        ` · ${model.device}`;
      for (const select of [$("target"), $("contrast")]) {
        model.classes.forEach((name, i) => select.append(el("option", { value: String(i), text: `${i} · ${name}` })));
      }
    } catch (err) {
      $("model-info").textContent = "Model information unavailable.";
      showError(err.message);
    }
  }

  async function loadSamples() {
    const list = $("samples");
    try {
      const { samples } = await getJSON("/samples");
      if (!samples.length) {
        list.append(el("li.muted", { text: "This model has no embedded-dataset samples." }));
        return;
      }
      for (const s of samples) {
        const label = `Sample ${s.index}: ${s.name}`;
        list.append(
          el(
            "li",
            {},
            el(
              "button.sample",
              { type: "button", title: label, "data-index": s.index, onclick: () => pickSample(s) },
              el("img.pixel", { src: s.url, alt: label, width: 48, height: 48 }),
            ),
          ),
        );
      }
    } catch (err) {
      list.append(el("li.muted", { text: `Samples unavailable: ${err.message}` }));
    }
  }

  // ------------------------------------------------------------------ input
  function useImage(blob, name) {
    if (state.imageURL) URL.revokeObjectURL(state.imageURL);
    state.file = blob;
    state.fileName = name;
    state.imageURL = URL.createObjectURL(blob);
    state.target = "";
    state.contrast = "";
    $("target").value = "";
    $("contrast").value = "";
    state.awaitingFirst = true;
    performance.clearMarks("fact:upload");
    performance.clearMarks("fact:result");
    performance.mark("fact:upload");
    explain();
  }

  async function pickSample(sample) {
    clearError();
    try {
      const response = await fetch(sample.url);
      if (!response.ok) throw new Error(await apiError(response));
      useImage(await response.blob(), `sample ${sample.index} (${sample.name})`);
    } catch (err) {
      showError(err.message);
    }
  }

  function bindInput() {
    const input = $("file");
    input.addEventListener("change", () => {
      if (input.files && input.files[0]) useImage(input.files[0], input.files[0].name);
      input.value = ""; // choosing the same file again explains it again
    });
    const drop = $("drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (event) => {
        event.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, () => drop.classList.remove("over"));
    }
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      const file = event.dataTransfer && event.dataTransfer.files[0];
      if (file) useImage(file, file.name);
      else showError("Nothing to explain: drop an image file (PNG, JPEG or WebP).");
    });

    $("target").addEventListener("change", (e) => {
      state.target = e.target.value;
      if (state.file) explain();
    });
    $("contrast").addEventListener("change", (e) => {
      state.contrast = e.target.value;
      if (state.file) explain();
    });
    $("top-k").addEventListener("change", (e) => {
      state.topK = Number(e.target.value);
      if (state.file) explain();
    });
    for (const radio of document.querySelectorAll('input[name="kind"]')) {
      radio.addEventListener("change", (e) => {
        state.kind = e.target.value;
        if (state.file) explain();
      });
    }
    $("show-maps").addEventListener("change", (e) => {
      state.showMaps = e.target.checked;
      if (state.result) renderHeatmaps(state.result);
    });
    $("options").addEventListener("submit", (e) => e.preventDefault());
  }

  // ------------------------------------------------------------------ explain
  async function explain() {
    const id = ++state.request;
    clearError();
    setStatus("Explaining…");
    $("result").setAttribute("aria-busy", "true");
    const form = new FormData();
    form.append("image", state.file, "upload");
    form.append("top_k", String(state.topK));
    form.append("heatmaps", "png");
    form.append("heatmap_kind", state.kind);
    if (state.target !== "") form.append("target", state.target);
    if (state.contrast !== "") form.append("contrast", state.contrast);
    let result;
    try {
      let response;
      try {
        response = await fetch("/explain", { method: "POST", body: form });
      } catch (err) {
        throw new Error(`Could not reach the service: ${err.message}`);
      }
      if (!response.ok) throw new Error(await apiError(response));
      result = await response.json();
    } catch (err) {
      if (id !== state.request) return;
      $("result").removeAttribute("aria-busy");
      setStatus("");
      if (state.awaitingFirst) {
        // A new image failed: what is on screen belongs to the previous one.
        state.awaitingFirst = false;
        state.file = null;
        state.result = null;
        $("result").hidden = true;
      }
      showError(`Could not explain ${state.fileName}. ${err.message}`);
      return;
    }
    if (id !== state.request) return; // a newer request is under way
    state.result = result;
    await render(result);
    $("result").removeAttribute("aria-busy");
    setStatus(`Explained ${state.fileName}: ${result.target.name}` + (result.contrast ? ` rather than ${result.contrast.name}` : ""));
    if (state.awaitingFirst) {
      state.awaitingFirst = false;
      // After the next paint: the result is on screen.
      await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
      performance.mark("fact:result");
      performance.measure("fact:first-result", "fact:upload", "fact:result");
    }
  }

  async function render(r) {
    $("result").hidden = false;
    renderPrediction(r);
    renderContributions(r);
    renderHeatmaps(r);
    renderTree(r);
    // Wait for the images so that "shown" means shown.
    const images = [...$("result").querySelectorAll("img")];
    await Promise.all(images.map((img) => (img.decode ? img.decode().catch(() => {}) : null)));
  }

  function renderPrediction(r) {
    const img = $("input-image");
    img.src = state.imageURL;
    img.alt = `The explained image: ${state.fileName}`;
    $("input-caption").textContent = state.fileName;
    $("predicted-class").textContent = r.prediction.name;
    $("predicted-probability").textContent = `(class ${r.prediction.index}, probability ${pct(r.prediction.probability)})`;
    const list = $("top-classes");
    list.replaceChildren(
      ...r.top_classes.map((c) => {
        const isTarget = c.index === r.target.index;
        const isContrast = r.contrast && c.index === r.contrast.index;
        return el(
          "li",
          { "data-class": c.index },
          el(
            "div.class-row",
            {},
            el("span.class-name", { text: c.name }),
            el("span.num", { text: pct(c.probability) }),
          ),
          el("div.prob", { "aria-hidden": "true" }, el("span", { style: `width:${(100 * c.probability).toFixed(1)}%` })),
          el(
            "div.class-actions",
            {},
            el("button.link", {
              type: "button",
              "aria-pressed": isTarget ? "true" : "false",
              text: isTarget ? "explained" : "explain this",
              onclick: () => chooseTarget(c.index),
            }),
            el("button.link", {
              type: "button",
              "aria-pressed": isContrast ? "true" : "false",
              disabled: isTarget,
              text: isContrast ? "contrast (clear)" : "why not this?",
              title: `why ${r.target.name} rather than ${c.name}`,
              onclick: () => chooseContrast(isContrast ? "" : c.index),
            }),
          ),
        );
      }),
    );
  }

  function chooseTarget(index) {
    state.target = String(index);
    $("target").value = state.target;
    if (state.contrast === state.target) {
      state.contrast = "";
      $("contrast").value = "";
    }
    explain();
  }
  function chooseContrast(index) {
    state.contrast = String(index);
    $("contrast").value = state.contrast;
    explain();
  }

  function conceptButton(concept, extra) {
    return el("button.concept", {
      type: "button",
      "data-layer": concept.layer,
      "data-id": concept.id,
      text: conceptName(concept) + (extra || ""),
      title: `Open the card of concept ${conceptName(concept)}`,
      onclick: (event) => openCard(concept.layer, concept.id, event.currentTarget),
    });
  }

  function bar(value, scale, kind) {
    const width = scale > 0 ? Math.min(50, (50 * Math.abs(value)) / scale) : 0;
    const side = value >= 0 ? "left:50%" : `left:${(50 - width).toFixed(2)}%`;
    const cls = kind || (value >= 0 ? "pos" : "neg");
    const clipped = Math.abs(value) > scale ? (value >= 0 ? ".cut-right" : ".cut-left") : ""; // beyond the scale: faded end
    const title = clipped ? "cut: longer than the chart's scale" : null;
    return el("div.bar", { "aria-hidden": "true", title }, el(`span.${cls}${clipped}`, { style: `${side};width:${width.toFixed(2)}%` }));
  }

  function renderContributions(r) {
    const target = r.target.name;
    const contrast = r.contrast ? r.contrast.name : null;
    $("why-title").textContent = contrast ? `3 · Why “${target}” rather than “${contrast}”` : `3 · Why “${target}”`;
    const sum = r.concepts.reduce((acc, c) => acc + c.contribution, 0) + r.other.contribution;
    const residual = r.completeness.residual;
    const rhs = contrast ? "logit(A) − logit(B)" : "logit − bias";
    const badge = $("completeness");
    const exact = r.faithfulness && r.faithfulness.exact;
    badge.textContent = `${exact ? "exact" : "approximate"}: Σ = ${rhs}, residual ${sci(residual)}`;
    badge.className = `badge ${exact ? "ok" : "warn"}`;
    badge.dataset.residual = String(residual);
    badge.title = `relative residual ${sci(r.completeness.relative_residual)}`;
    const targetClass = r.top_classes.find((c) => c.index === r.target.index);
    const eq = contrast
      ? `Σ contributions = ${plain(sum)} · explained = logit(${target}) − logit(${contrast}) = ${plain(r.explained)}`
      : `Σ contributions = ${plain(sum)} · explained = logit − bias = ${plain(r.explained)}` +
        (targetClass ? ` (logit ${plain(targetClass.logit)}, bias ${plain(r.logit_bias)})` : ` (bias ${plain(r.logit_bias)})`);
    $("equation").textContent = eq;

    const rows = r.concepts.map((c) => ({ c, value: c.contribution, share: c.share }));
    // Bars share one scale, set by the concepts, the remainder and the sum (a larger bias bar is clipped).
    const scale = Math.max(1e-12, ...rows.map((x) => Math.abs(x.value)), Math.abs(r.other.contribution), Math.abs(sum));
    const body = $("contributions").tBodies[0];
    const tableRows = [
      ...rows.map(({ c, value, share }) =>
        el(
          "tr",
          { "data-concept": `${c.layer}:${c.id}` },
          el("th", { scope: "row" }, conceptButton(c)),
          el("td", {}, bar(value, scale)),
          el("td.num.value", { text: fmt(value), "data-value": String(value) }),
          el("td.num.share", { text: value > 0 ? pct(share) : "—", "data-value": String(share) }),
        ),
      ),
      el(
        "tr.other-row",
        { "data-row": "other" },
        el("th", { scope: "row", text: "other concepts" }),
        el("td", {}, bar(r.other.contribution, scale)),
        el("td.num.value", { text: fmt(r.other.contribution), "data-value": String(r.other.contribution) }),
        el("td.num", { text: "" }),
      ),
      el(
        "tr.total-row",
        { "data-row": "sum" },
        el("th", { scope: "row", text: "Σ (= explained)" }),
        el("td", {}, bar(sum, scale)),
        el("td.num.value", { text: fmt(sum), "data-value": String(sum) }),
        el("td.num", { text: "" }),
      ),
      contrast
        ? null
        : el(
            "tr.bias-row",
            { "data-row": "bias" },
            el("th", { scope: "row", text: "logit bias" }),
            el("td", {}, bar(r.logit_bias, scale, "bias")),
            el("td.num.value", { text: fmt(r.logit_bias), "data-value": String(r.logit_bias) }),
            el("td.num", { text: "" }),
          ),
    ];
    body.replaceChildren(...tableRows.filter(Boolean)); // no bias row for a contrast (it cancels)
  }

  function renderHeatmaps(r) {
    const kindName = state.kind === "signed" ? "signed (red: towards, blue: against)" : "B-cos colour";
    $("where-note").textContent = state.showMaps
      ? `Each top concept's per-pixel contribution to its activation (they sum to it) — ${kindName}.`
      : "Heatmaps hidden: the input image under each concept.";
    const box = $("heatmaps");
    box.replaceChildren(
      ...r.concepts.map((c) => {
        const layers = [el("img.pixel.under", { src: state.imageURL, alt: "" })];
        const map = c.heatmap && c.heatmap.png_base64 ? png(c.heatmap.png_base64) : null;
        const alt = map
          ? `${c.heatmap.kind === "signed" ? "Signed" : "B-cos colour"} heatmap of concept ${conceptName(c)} over the image`
          : `The image (no heatmap for concept ${conceptName(c)})`;
        if (map && state.showMaps) layers.push(el("img.pixel.map", { src: map, alt }));
        else layers[0].setAttribute("alt", `The image, concept ${conceptName(c)} heatmap hidden`);
        return el(
          "figure.heat",
          { "data-concept": `${c.layer}:${c.id}` },
          el(`div.stack.${state.showMaps ? c.heatmap?.kind || "none" : "plain"}`, {}, layers),
          el("figcaption", {}, conceptButton(c), el("span.num", { text: ` ${fmt(c.contribution)}` })),
        );
      }),
    );
  }

  function renderTree(r) {
    const tree = $("tree");
    const lower = r.concepts.find((c) => c.children && c.children.length);
    $("tree-note").textContent = lower
      ? `Expand a ${r.layer} concept: the ${lower.children[0].layer} concepts that contributed most to its activation.`
      : `No lower concept layer was traced for ${r.layer}.`;
    tree.replaceChildren(
      ...r.concepts.map((c, i) => {
        const children = c.children || [];
        const scale = Math.max(1e-12, ...children.map((k) => Math.abs(k.contribution_to_parent)));
        return el(
          "li",
          { "data-concept": `${c.layer}:${c.id}` },
          el(
            "details",
            { open: i === 0 },
            el(
              "summary",
              {},
              el("strong", { text: conceptName(c) }),
              ` ${fmt(c.contribution)} to the logit · activation ${plain(c.activation, 2)}`,
            ),
            el("div.node", {}, conceptButton(c, " — open card")),
            children.length
              ? el(
                  "ul.children",
                  {},
                  children.map((k) =>
                    el(
                      "li",
                      { "data-concept": `${k.layer}:${k.id}` },
                      conceptButton(k),
                      el("div.mini", { "aria-hidden": "true" }, el(`span.${k.contribution_to_parent >= 0 ? "pos" : "neg"}`, {
                        style: `width:${((100 * Math.abs(k.contribution_to_parent)) / scale).toFixed(1)}%`,
                      })),
                      el("span.num", {
                        text: `${fmt(k.contribution_to_parent, 2)}` + (c.activation > 0 ? ` (${pct(k.contribution_to_parent / c.activation)} of its activation)` : ""),
                      }),
                    ),
                  ),
                )
              : el("p.muted", { text: "no lower-layer trace" }),
          ),
        );
      }),
    );
  }

  // ------------------------------------------------------------------ concept card
  async function openCard(layer, id, opener) {
    const dialog = $("card");
    state.cardOpener = opener || null;
    $("card-title").textContent = `Concept ${layer} #${id}`;
    const body = $("card-body");
    body.replaceChildren(el("p.muted", { text: "Loading the concept card…" }));
    if (!dialog.open) dialog.showModal();
    let card;
    try {
      card = await getJSON(`/concepts/${encodeURIComponent(layer)}/${encodeURIComponent(id)}`);
    } catch (err) {
      body.replaceChildren(el("p.error", { role: "alert", text: err.message }));
      return;
    }
    if ($("card-title").textContent !== `Concept ${layer} #${id}`) return; // another card was opened meanwhile
    const split = card.dataset && card.dataset.split ? ` ${card.dataset.split}` : "";
    const supports = card.supports.slice(0, 5);
    const scale = Math.max(1e-12, ...supports.map((s) => Math.abs(s.mean_contribution)));
    body.replaceChildren(
      el("p.frequency", { text: `Fires on ${pct(card.frequency)} of the${split} images.` }),
      el("h3", { text: "Classes it supports (mean contribution)" }),
      supports.length
        ? el(
            "ul.supports",
            {},
            supports.map((s) =>
              el(
                "li",
                {},
                el("span.class-name", { text: s.name }),
                el("div.mini", { "aria-hidden": "true" }, el("span.pos", {
                  style: `width:${((100 * s.mean_contribution) / scale).toFixed(1)}%`,
                })),
                el("span.num", { text: fmt(s.mean_contribution, 4) }),
              ),
            ),
          )
        : el("p.muted", { text: "No class on average gains from it." }),
      el("h3", { text: "Top-activating dataset images (image · heatmap)" }),
      el(
        "ul.examples",
        {},
        card.examples.map((e) =>
          el(
            "li",
            {},
            e.image_png_base64
              ? el("img.pixel", { src: png(e.image_png_base64), alt: `Dataset image ${e.index}`, width: 96, height: 96 })
              : null,
            e.heatmap_png_base64
              ? el("img.pixel.dark", {
                  src: png(e.heatmap_png_base64),
                  alt: `B-cos colour heatmap of concept ${layer} #${id} on dataset image ${e.index}`,
                  width: 96,
                  height: 96,
                })
              : null,
            el("span.muted", { text: `#${e.index} · activation ${plain(e.activation, 2)}` }),
          ),
        ),
      ),
    );
  }

  function bindCard() {
    const dialog = $("card");
    $("card-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close(); // a click on the backdrop
    });
    dialog.addEventListener("close", () => {
      if (state.cardOpener && state.cardOpener.isConnected) state.cardOpener.focus();
    });
  }

  bindInput();
  bindCard();
  loadModel().then(loadSamples);
})();
