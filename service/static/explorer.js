// FaCT explanation explorer: a plain client of the service's JSON API (no framework, no build step).
// GET /model, GET /samples, POST /explain (multipart; JSON for a region), POST /intervene,
// GET /concepts/{layer}/{id}, PUT /concepts/{layer}/{id}/label (bearer token, kept in memory only).
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
    dataURL: null, // Promise of the image as a data: URL, for the JSON requests
    labels: new Map(), // "layer:id" → label record or null, as the newest response had it
    token: "", // the admin token: in this page's memory only (never stored, never in a URL)
    off: new Set(), // ids of the reported layer's concepts switched off
    intervention: 0, // newest /intervene request id
    box: null, // the queried region {x0, y0, x1, y1} in model input pixels
    regionRequest: 0, // newest region request id
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

  // A JSON request; the API's error message on failure.
  async function sendJSON(url, body, method = "POST", headers = {}) {
    let response;
    try {
      response = await fetch(url, {
        method,
        headers: { "Content-Type": "application/json", Accept: "application/json", ...headers },
        body: JSON.stringify(body),
      });
    } catch (err) {
      throw new Error(`Could not reach the service (${url}): ${err.message}`);
    }
    if (!response.ok) throw new Error(await apiError(response));
    return response.json();
  }

  function imageData() {
    if (!state.dataURL) {
      const blob = state.file;
      state.dataURL = new Promise((resolve, reject) => {
        const reader = new FileReader();
        reader.onload = () => resolve(reader.result); // the API accepts the data: URL prefix
        reader.onerror = () => reject(new Error("the image could not be read"));
        reader.readAsDataURL(blob);
      });
    }
    return state.dataURL;
  }

  // The class options of the shown explanation, for the follow-up requests.
  function sameQuestion(r) {
    const fields = { top_k: state.topK, target: r.target.index };
    if (r.contrast) fields.contrast = r.contrast.index;
    return fields;
  }

  const inputSize = () => (state.model ? state.model.input_size : 0);

  // The model input's view of an image: squashed to a square, or resized and centre-cropped.
  function fitToModel(img, crop) {
    const resize = state.model && state.model.preprocessing && state.model.preprocessing.resize;
    img.style.objectFit = resize ? "cover" : "fill";
    if (crop) img.style.transform = resize && resize > inputSize() ? `scale(${resize / inputSize()})` : "";
  }

  // ------------------------------------------------------------------ labels
  const keyOf = (layer, id) => `${layer}:${id}`;

  // Every concept entry of a response carries its label (null: none); edits name it as `concept`.
  function learnLabels(node, layer) {
    if (Array.isArray(node)) return node.forEach((item) => learnLabels(item, layer));
    if (!node || typeof node !== "object") return;
    if (typeof node.layer === "string") layer = node.layer;
    const id = Number.isInteger(node.id) ? node.id : node.concept;
    if ("label" in node && layer && Number.isInteger(id)) state.labels.set(keyOf(layer, id), node.label);
    for (const [key, value] of Object.entries(node)) if (key !== "label") learnLabels(value, layer);
  }
  function labelOf(layer, id) {
    const found = state.labels.get(keyOf(layer, id));
    return found && found.label ? found : null;
  }
  function paintLabel(span) {
    const found = state.labels.get(span.dataset.labelFor);
    const text = found && found.label ? found.label : span.dataset.empty || "";
    span.textContent = text;
    span.title = found && found.note ? found.note : "";
    span.hidden = !text;
  }
  function labelSpan(layer, id, empty) {
    const span = el("span.clabel", { "data-label-for": keyOf(layer, id), "data-empty": empty });
    paintLabel(span);
    return span;
  }
  function refreshLabels() {
    document.querySelectorAll("[data-label-for]").forEach(paintLabel);
  }
  function learned(record) {
    learnLabels(record);
    refreshLabels();
    return record;
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
    state.dataURL = null;
    state.off.clear();
    clearRegion();
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
    state.result = learned(result);
    // Switched-off concepts still listed stay off (and are re-run); the region is queried again.
    state.off = new Set([...state.off].filter((c) => result.concepts.some((x) => x.id === c)));
    await render(result);
    if (state.off.size) intervene();
    else hideIntervention();
    if (state.box) queryRegion();
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
    renderRegionImage();
    // Wait for the images so that "shown" means shown.
    const images = [...$("result").querySelectorAll("img")];
    await Promise.all(images.map((img) => (img.decode ? img.decode().catch(() => {}) : null)));
  }

  function renderPrediction(r) {
    const img = $("input-image");
    fitToModel(img, false);
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
    return el(
      "button.concept",
      {
        type: "button",
        "data-layer": concept.layer,
        "data-id": concept.id,
        title: `Open the card of concept ${conceptName(concept)}`,
        onclick: (event) => openCard(concept.layer, concept.id, event.currentTarget),
      },
      conceptName(concept),
      labelSpan(concept.layer, concept.id),
      extra || null,
    );
  }

  function conceptToggle(c) {
    return el("input.toggle", {
      type: "checkbox",
      checked: !state.off.has(c.id),
      "aria-label": `Include concept ${conceptName(c)} (clear to switch it off)`,
      title: "Clear to re-run the network without this concept",
      "data-toggle": c.id,
      onchange: (event) => toggleConcept(c.id, event.target.checked),
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
          el("th", { scope: "row" }, conceptToggle(c), conceptButton(c)),
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
        fitToModel(layers[0], true);
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

  // ------------------------------------------------------------------ intervention
  function toggleConcept(id, on) {
    if (on) state.off.delete(id);
    else state.off.add(id);
    if (state.off.size) intervene();
    else hideIntervention();
  }

  function hideIntervention() {
    state.intervention++; // an answer still on its way is ignored
    $("intervention").hidden = true;
    $("intervention-body").replaceChildren();
    for (const box of document.querySelectorAll("#contributions input[data-toggle]")) box.checked = true;
  }

  async function intervene() {
    const r = state.result;
    const id = ++state.intervention;
    const remove = [...state.off].sort((a, b) => a - b);
    const names = remove.map((c) => `${r.layer} #${c}`).join(", ");
    $("intervention").hidden = false;
    $("intervention").setAttribute("aria-busy", "true");
    $("intervention-status").textContent = `Re-running the network without ${names}…`;
    let iv;
    try {
      iv = await sendJSON("/intervene", { image_base64: await imageData(), layer: r.layer, remove, ...sameQuestion(r) });
    } catch (err) {
      if (id !== state.intervention) return;
      $("intervention").removeAttribute("aria-busy");
      $("intervention-status").textContent = "";
      $("intervention-body").replaceChildren(el("p.error", { role: "alert", text: `Could not switch ${names} off. ${err.message}` }));
      return;
    }
    if (id !== state.intervention || r !== state.result) return;
    $("intervention").removeAttribute("aria-busy");
    $("intervention-status").textContent = `Explaining “${iv.target.name}” with ${names} switched off.`;
    renderIntervention(learned(iv));
  }

  function renderIntervention(iv) {
    const { before, after, change } = iv;
    const target = iv.target.name;
    const explained = iv.contrast ? "logit(A) − logit(B)" : "logit − bias";
    const cell = (name, value, text) => el(`td.num.${name}`, { text, "data-value": String(value) });
    const row = (label, name, a, b, show) =>
      el("tr", { "data-row": name }, el("th", { scope: "row", text: label }), cell("before", a, show(a)), cell("after", b, show(b)));
    const predicted = (p) => el("span", {}, el("span.class-name", { text: p.name }), ` (${pct(p.probability)})`);
    const change_ = (label, name, value, note) =>
      el("tr", { "data-row": name }, el("th", { scope: "row", text: label }), el("td.num.value", { text: fmt(value), "data-value": String(value) }), el("td.muted", { text: note }));
    $("intervention-body").replaceChildren(
      el(
        "table.compare",
        {},
        el("caption.visually-hidden", { text: "The original explanation next to the one without the switched-off concepts" }),
        el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "" }), el("th.num", { scope: "col", text: "before" }), el("th.num", { scope: "col", text: "after (switched off)" }))),
        el(
          "tbody",
          {},
          el(
            "tr",
            { "data-row": "prediction" },
            el("th", { scope: "row", text: "prediction" }),
            el("td.num.before", {}, predicted(before.prediction)),
            el("td.num.after", { "data-index": after.prediction.index }, predicted(after.prediction)),
          ),
          row("probability of the explained class", "probability", before.probability_of_target, after.probability_of_target, pct),
          row(`explained logit (${explained})`, "explained", before.explained, after.explained, plain),
        ),
      ),
      el("h4", { text: "Change of the explained logit" }),
      el(
        "table.compare.changes",
        {},
        el("caption.visually-hidden", { text: "Predicted and measured change of the explained logit" }),
        el(
          "tbody",
          {},
          change_("predicted by the contributions", "predicted", change.predicted, "minus the removed concepts' contributions"),
          change_("measured", "measured", change.measured, "re-running the network without them"),
          change_("gap", "gap", change.gap, "measured − predicted: what the B-cos layers' dynamic scales add"),
        ),
      ),
      el("h4", { text: "Top concepts without them" }),
      el(
        "ol.after-concepts",
        {},
        after.concepts.map((c) =>
          el("li", { "data-concept": keyOf(c.layer, c.id) }, conceptButton(c), el("span.num.value", { text: ` ${fmt(c.contribution)}`, "data-value": String(c.contribution) })),
        ),
      ),
    );
  }

  // ------------------------------------------------------------------ region
  function renderRegionImage() {
    const img = $("region-image");
    fitToModel(img, true);
    img.src = state.imageURL;
    const size = inputSize();
    img.alt = `The explained image at the model input (${size} × ${size} pixels): drag a box on it to query that region`;
    for (const name of ["x0", "y0", "x1", "y1"]) $(`box-${name}`).max = String(size);
  }

  function drawBox(box) {
    const shape = $("region-box");
    const size = inputSize();
    shape.hidden = !box || !size;
    if (shape.hidden) return;
    const p = (v) => `${((100 * v) / size).toFixed(3)}%`;
    Object.assign(shape.style, { left: p(box.x0), top: p(box.y0), width: p(box.x1 - box.x0), height: p(box.y1 - box.y0) });
  }

  function setBox(box) {
    state.box = box;
    for (const name of ["x0", "y0", "x1", "y1"]) $(`box-${name}`).value = box ? String(box[name]) : "";
    drawBox(box);
  }

  function clearRegion() {
    setBox(null);
    state.regionRequest++;
    $("region-result").replaceChildren(
      el("p.muted", { id: "region-note", text: "Drag a box on the image (or type one) to see which concepts contributed inside it." }),
    );
  }

  function bindRegion() {
    const surface = $("region-surface");
    let drag = null;
    const at = (event) => {
      const rect = surface.getBoundingClientRect();
      const size = inputSize();
      const clamp = (v) => Math.min(size, Math.max(0, v));
      return { x: clamp(((event.clientX - rect.left) / rect.width) * size), y: clamp(((event.clientY - rect.top) / rect.height) * size) };
    };
    const spanned = (a, b) => ({ x0: Math.min(a.x, b.x), y0: Math.min(a.y, b.y), x1: Math.max(a.x, b.x), y1: Math.max(a.y, b.y) });
    surface.addEventListener("pointerdown", (event) => {
      if (!state.result || !inputSize() || (event.pointerType === "mouse" && event.button !== 0)) return;
      event.preventDefault();
      surface.setPointerCapture(event.pointerId);
      drag = { id: event.pointerId, from: at(event), x: event.clientX, y: event.clientY };
    });
    surface.addEventListener("pointermove", (event) => {
      if (drag && event.pointerId === drag.id) drawBox(spanned(drag.from, at(event)));
    });
    surface.addEventListener("pointerup", (event) => {
      if (!drag || event.pointerId !== drag.id) return;
      const { from, x, y } = drag;
      drag = null;
      if (Math.hypot(event.clientX - x, event.clientY - y) < 4) return drawBox(state.box); // a click, not a drag
      // Whole model pixels, at least one wide.
      const size = inputSize();
      const raw = spanned(from, at(event));
      const edge = (a, b) => {
        let lo = Math.round(a);
        let hi = Math.round(b);
        if (hi <= lo) [lo, hi] = lo < size ? [lo, lo + 1] : [size - 1, size];
        return [lo, hi];
      };
      const [x0, x1] = edge(raw.x0, raw.x1);
      const [y0, y1] = edge(raw.y0, raw.y1);
      setBox({ x0, y0, x1, y1 });
      queryRegion();
    });
    surface.addEventListener("pointercancel", () => {
      drag = null;
      drawBox(state.box);
    });
    $("region-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (!state.result) return;
      const [x0, y0, x1, y1] = ["x0", "y0", "x1", "y1"].map((name) => Number($(`box-${name}`).value));
      setBox({ x0, y0, x1, y1 });
      queryRegion();
    });
    $("region-whole").addEventListener("click", () => {
      if (!state.result) return;
      setBox({ x0: 0, y0: 0, x1: inputSize(), y1: inputSize() });
      queryRegion();
    });
    $("region-clear").addEventListener("click", clearRegion);
    $("intervention-reset").addEventListener("click", () => {
      state.off.clear();
      hideIntervention();
    });
  }

  async function queryRegion() {
    const r = state.result;
    const box = state.box;
    const id = ++state.regionRequest;
    const out = $("region-result");
    out.setAttribute("aria-busy", "true");
    let answer;
    try {
      answer = await sendJSON("/explain", { image_base64: await imageData(), heatmaps: "none", region: { box }, ...sameQuestion(r) });
    } catch (err) {
      if (id !== state.regionRequest) return;
      out.removeAttribute("aria-busy");
      out.replaceChildren(el("p.error", { role: "alert", text: `Could not query the region. ${err.message}` }));
      return;
    }
    if (id !== state.regionRequest || r !== state.result) return;
    out.removeAttribute("aria-busy");
    renderRegion(learned(answer).region, r);
  }

  function renderRegion(g, r) {
    const [x0, y0, x1, y1] = g.box;
    const size = inputSize();
    const num = (name, value, text) => el("strong", { id: `region-${name}`, text, "data-value": String(value) });
    const scale = Math.max(1e-12, ...g.concepts.map((c) => Math.abs(c.contribution)));
    $("region-result").replaceChildren(
      el("h3", { text: `Region x ${x0}–${x1}, y ${y0}–${y1} of ${size} × ${size} pixels` }),
      el(
        "p.region-summary",
        {},
        "Inside it: ",
        num("total", g.total, fmt(g.total)),
        ` of the explained ${plain(r.explained)} — `,
        num("share", g.share, pct(g.share)),
        " of the explained logit · covers ",
        num("coverage", g.coverage, pct(g.coverage)),
        " of the image · outside: ",
        num("outside", g.outside, fmt(g.outside)),
      ),
      el(
        "table.chart",
        { id: "region-concepts" },
        el("caption.visually-hidden", { text: "Top concepts by their contribution inside the region" }),
        el(
          "thead",
          {},
          el("tr", {}, el("th", { scope: "col", text: "concept" }), el("th", { scope: "col", text: "in the region" }),
            el("th.num", { scope: "col", text: "value" }), el("th.num", { scope: "col", text: "whole image" })),
        ),
        el(
          "tbody",
          {},
          g.concepts.map((c) =>
            el(
              "tr",
              { "data-concept": keyOf(c.layer, c.id) },
              el("th", { scope: "row" }, conceptButton(c)),
              el("td", {}, bar(c.contribution, scale)),
              el("td.num.value", { text: fmt(c.contribution), "data-value": String(c.contribution) }),
              el("td.num.whole", { text: fmt(c.in_image), "data-value": String(c.in_image) }),
            ),
          ),
        ),
      ),
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
    learned(card);
    const split = card.dataset && card.dataset.split ? ` ${card.dataset.split}` : "";
    const supports = card.supports.slice(0, 5);
    const scale = Math.max(1e-12, ...supports.map((s) => Math.abs(s.mean_contribution)));
    body.replaceChildren(
      labelBox(layer, id),
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

  function labelBox(layer, id, message) {
    const found = labelOf(layer, id);
    const meta = found
      ? [`version ${found.version}`, found.updated_at && `${found.updated_at.slice(0, 16).replace("T", " ")}${/(Z|\+00:00)$/.test(found.updated_at) ? " UTC" : ""}`, found.author && `by ${found.author}`]
      : [];
    const input = (name, label, attrs) => el("label", {}, label, el("input", { name, ...attrs }));
    const form = el(
      "form.label-form",
      { "aria-label": `Edit the label of concept ${layer} #${id}`, onsubmit: (event) => saveLabel(event, layer, id) },
      input("label", "Label", { required: true, maxlength: 200, value: found ? found.label : "" }),
      input("note", "Note", { maxlength: 2000, value: found ? found.note : "" }),
      input("token", "Admin token", { type: "password", autocomplete: "off", spellcheck: "false" }),
      el("button.small", { type: "submit", text: "Save label" }),
      el("p.error", { role: "alert", hidden: true }),
    );
    form.elements.token.value = state.token; // from this page's memory, never from storage
    return el(
      "div.label-box",
      {},
      el("p.label-line", {}, el("strong", { text: "Label: " }), labelSpan(layer, id, "none yet"), meta.length ? el("span.muted", { text: ` (${meta.filter(Boolean).join(" · ")})` }) : null),
      found && found.note ? el("p.label-note.muted", { text: found.note }) : null,
      message ? el("p.saved", { role: "status", text: message }) : null,
      el("details", {}, el("summary", { text: found ? "Edit the label" : "Add a label" }), form),
    );
  }

  async function saveLabel(event, layer, id) {
    event.preventDefault();
    const form = event.currentTarget;
    const problem = form.querySelector(".error");
    state.token = form.elements.token.value;
    const found = labelOf(layer, id);
    const body = { label: form.elements.label.value, note: form.elements.note.value };
    if (found) body.expected_version = found.version; // refused (409) if someone else edited it meanwhile
    const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
    const button = form.querySelector("button");
    button.disabled = true;
    let saved;
    try {
      saved = await sendJSON(`/concepts/${encodeURIComponent(layer)}/${encodeURIComponent(id)}/label`, body, "PUT", headers);
    } catch (err) {
      button.disabled = false;
      problem.textContent = `Could not save the label. ${err.message}`;
      problem.hidden = false;
      return;
    }
    state.labels.set(keyOf(layer, id), saved);
    refreshLabels();
    const box = form.closest(".label-box");
    if (box && box.isConnected) box.replaceWith(labelBox(layer, id, `Saved: version ${saved.version}.`));
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
  bindRegion();
  bindCard();
  loadModel().then(loadSamples);
})();
