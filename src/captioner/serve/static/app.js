// The captioner demo page: upload an image, show its caption, its n-best list, and for each word
// where the model looked (the word's attention grid, smoothly upsampled and blended over the photo).
//
// Hooks for tests and the console: window.captionerResult is the last API answer; the caption
// paragraph (#caption) has data-caption and data-active-index; the overlay canvas (#overlay) is
// shown while a word is active and carries data-word, data-word-index and data-peak-x/-y (the
// centre of the grid cell with the most attention, as fractions of the image's width and height).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    modelInfo: $("model-info"),
    dropZone: $("drop-zone"),
    fileInput: $("file-input"),
    maxUpload: $("max-upload"),
    beam: $("beam-size"),
    nBest: $("n-best"),
    status: $("status"),
    error: $("error"),
    result: $("result"),
    stage: $("stage"),
    preview: $("preview"),
    overlay: $("overlay"),
    spinner: $("spinner"),
    attentionLabel: $("attention-label"),
    caption: $("caption"),
    captionHint: $("caption-hint"),
    nBestList: $("n-best-list"),
    tags: $("tags"),
    tagsHeading: $("tags-heading"),
    steering: $("steering"),
    timing: $("timing"),
  };

  const VEIL = [12, 12, 20]; // the colour that dims what the model did not look at
  const VEIL_OPACITY = 0.8; // of the least attended places

  const state = {
    limits: null,
    file: null,
    objectUrl: null,
    controller: null,
    requestId: 0,
    result: null,
    active: -1, // the word whose attention is shown
    pinned: -1, // the word clicked (shown when nothing is hovered or focused)
    previewOk: false,
  };

  // ----- model information -----------------------------------------------------------------------

  async function loadInfo() {
    try {
      const response = await fetch("healthz", { cache: "no-store" });
      const info = await response.json();
      const model = info.model;
      els.modelInfo.textContent =
        `${model.decoder_name} · ${model.encoder} · ${model.vocab_size.toLocaleString()} words · model ${model.name}`;
      state.limits = info.limits;
      els.maxUpload.textContent = String(info.limits.max_upload_mb);
      els.beam.max = String(info.limits.max_beam_size);
      els.nBest.max = String(info.limits.max_n_best);
      els.beam.value = String(info.defaults.beam_size);
      els.nBest.value = String(info.defaults.n_best);
    } catch (error) {
      els.modelInfo.textContent = "Cannot reach the server.";
    } finally {
      document.body.dataset.ready = "true";
    }
  }

  // ----- choosing an image -----------------------------------------------------------------------

  function imageFrom(list) {
    const files = Array.from(list || []);
    return files.find((file) => file.type.startsWith("image/")) || files[0] || null;
  }

  els.fileInput.addEventListener("change", () => {
    const file = imageFrom(els.fileInput.files);
    els.fileInput.value = ""; // so choosing the same file again is a change too
    if (file) handleFile(file);
  });

  // Drops anywhere on the page count, so a near miss does not make the browser open the file.
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    dragDepth += 1;
    els.dropZone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) els.dropZone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    els.dropZone.classList.remove("dragging");
    const file = imageFrom(event.dataTransfer && event.dataTransfer.files);
    if (file) handleFile(file);
  });

  document.addEventListener("paste", (event) => {
    const items = Array.from((event.clipboardData && event.clipboardData.items) || []);
    const item = items.find((entry) => entry.kind === "file" && entry.type.startsWith("image/"));
    const file = item && item.getAsFile();
    if (file) {
      event.preventDefault();
      handleFile(file);
    }
  });

  for (const input of [els.beam, els.nBest]) {
    input.addEventListener("change", () => {
      if (state.file) requestCaption(state.file);
    });
  }

  function handleFile(file) {
    clearError();
    const limit = state.limits && state.limits.max_upload_bytes;
    if (limit && file.size > limit) {
      showError(`${file.name || "This file"} is ${megabytes(file.size)} MB; the largest upload is ${state.limits.max_upload_mb} MB.`);
      return;
    }
    state.file = file;
    showPreview(file);
    requestCaption(file);
  }

  function megabytes(bytes) {
    return (bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0);
  }

  function showPreview(file) {
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(file);
    state.previewOk = false;
    clearResult();
    els.preview.alt = `The uploaded image${file.name ? ", " + file.name : ""}`;
    els.preview.src = state.objectUrl;
    els.result.hidden = false;
  }

  els.preview.addEventListener("load", () => {
    state.previewOk = true;
    redraw();
  });
  els.preview.addEventListener("error", () => {
    state.previewOk = false;
    els.attentionLabel.textContent = state.file ? "This browser cannot display this file." : "";
  });

  // ----- asking the server -----------------------------------------------------------------------

  async function requestCaption(file) {
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const id = ++state.requestId;
    clearError();
    clearResult();
    setBusy(true, file);

    const form = new FormData();
    form.append("image", file, file.name || "pasted-image");
    const params = new URLSearchParams({ beam_size: els.beam.value, n_best: els.nBest.value });
    let response;
    let body = null;
    try {
      response = await fetch(`api/caption?${params}`, { method: "POST", body: form, signal: controller.signal });
      body = await response.json().catch(() => null);
    } catch (error) {
      if (error.name === "AbortError") return;
      if (id === state.requestId) {
        setBusy(false);
        els.caption.textContent = "";
        showError(`Cannot reach the server (${error.message}).`);
      }
      return;
    }
    if (id !== state.requestId) return; // a newer image was chosen meanwhile
    state.controller = null;
    setBusy(false);
    if (!response.ok || !body || body.error) {
      const message = body && body.error ? body.error : `The server answered ${response.status} ${response.statusText}.`;
      showError(message);
      els.caption.textContent = "";
      if (!state.previewOk) els.result.hidden = true;
      return;
    }
    render(body);
  }

  function setBusy(busy, file) {
    els.result.setAttribute("aria-busy", busy ? "true" : "false");
    els.stage.classList.toggle("busy", busy);
    els.spinner.hidden = !busy;
    if (busy) {
      els.status.textContent = `Captioning ${file && file.name ? file.name : "the image"}…`;
      els.caption.textContent = "…";
    } else {
      els.status.textContent = "";
    }
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
    els.status.textContent = "";
  }

  function clearError() {
    els.error.hidden = true;
    els.error.textContent = "";
  }

  // ----- showing the answer ----------------------------------------------------------------------

  function clearResult() {
    state.result = null;
    state.active = -1;
    state.pinned = -1;
    els.caption.replaceChildren();
    delete els.caption.dataset.caption;
    delete els.caption.dataset.activeIndex;
    els.captionHint.textContent = "";
    els.nBestList.replaceChildren();
    els.tags.replaceChildren();
    els.steering.hidden = true;
    els.timing.textContent = "";
    hideOverlay();
  }

  function hasAttention(result) {
    return Array.isArray(result.attention) && result.attention.length === result.words.length && result.words.length > 0;
  }

  function render(result) {
    state.result = result;
    window.captionerResult = result;
    const interactive = hasAttention(result);
    els.caption.replaceChildren();
    if (result.words.length === 0) {
      els.caption.textContent = "(the model wrote an empty caption)";
    }
    result.words.forEach((word, index) => {
      if (index > 0) els.caption.append(" ");
      els.caption.append(interactive ? wordButton(word, index, result.words.length) : plainWord(word));
    });
    els.caption.dataset.caption = result.caption;
    els.captionHint.textContent = interactive
      ? "Hover, focus or click a word to see where the model looked when it wrote it (arrow keys move, Esc clears)."
      : result.attention === null
        ? "This model has no attention (Show and Tell), so there are no maps to show."
        : "";

    els.nBestList.replaceChildren(
      ...result.n_best.map((entry, rank) => {
        const item = document.createElement("li");
        const text = document.createElement("span");
        text.textContent = entry.caption || "(empty)";
        // The list is ranked by the score (the log-probability divided by the length penalty, when
        // the model uses one): show what it is ranked by, and the log-probability beside it.
        const score = document.createElement("span");
        score.className = "score";
        const penalised = Math.abs(entry.score - entry.log_prob) > 5e-5;
        score.textContent = penalised
          ? `score ${entry.score.toFixed(2)} · log p ${entry.log_prob.toFixed(2)}`
          : `log p ${entry.log_prob.toFixed(2)}`;
        score.title = penalised
          ? "Ranked by the score: the log-probability divided by the length penalty, so longer captions are not always last."
          : "Ranked by the log-probability of the caption.";
        item.dataset.score = String(entry.score);
        item.append(text, score);
        if (rank === 0) item.setAttribute("aria-current", "true");
        return item;
      }),
    );
    // Visual concepts from the encoder's ImageNet classifier, likeliest first (none for other encoders).
    const tags = result.tags || [];
    els.tags.replaceChildren(
      ...tags.map((tag) => {
        const item = document.createElement("li");
        item.textContent = `${tag.word} ${Math.round(tag.probability * 100)}%`;
        item.dataset.probability = String(tag.probability);
        return item;
      }),
    );
    els.tags.hidden = els.tagsHeading.hidden = tags.length === 0;
    const steering = steeringText(result);
    els.steering.textContent = steering;
    els.steering.hidden = steering === "";
    const timing = result.timing_ms || {};
    const batch = result.batch_size > 1 ? `, batched with ${result.batch_size - 1} other${result.batch_size > 2 ? "s" : ""}` : "";
    els.timing.textContent =
      `${result.width} × ${result.height} px · beam ${result.settings.beam_size} · ` +
      `captioned in ${Math.round(timing.total || 0)} ms (model ${Math.round(timing.model || 0)} ms${batch})`;
    els.status.textContent = ""; // the caption itself is announced (#caption is a live region), and shown once
  }

  // What steered the caption: the words it had to name (from what the encoder sees), whether it could,
  // or that the photo is like the model's training photos, so nothing was required of it.
  function steeringText(result) {
    const required = (result.constraints || []).map((words) =>
      words.length > 1 ? `${words[0]} (or ${words.slice(1).join(", ")})` : words[0],
    );
    if (required.length > 0) {
      const named = required.join(" and ");
      return result.constraints_met === false
        ? `No caption it could write names ${named}: this is its best caption without it.`
        : `The caption had to name ${named}.`;
    }
    return result.familiar === true ? "A photo like the model's training photos: no concept was required of the caption." : "";
  }

  function plainWord(word) {
    const span = document.createElement("span");
    span.className = "plain-word";
    span.textContent = word;
    return span;
  }

  function wordButton(word, index, count) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "word";
    button.textContent = word;
    button.dataset.index = String(index);
    button.setAttribute("aria-pressed", "false");
    button.title = `Where the model looked for “${word}” (word ${index + 1} of ${count})`;
    button.addEventListener("mouseenter", () => showWord(index));
    button.addEventListener("mouseleave", () => showWord(state.pinned));
    button.addEventListener("focus", () => showWord(index));
    button.addEventListener("blur", () => showWord(state.pinned));
    button.addEventListener("click", () => {
      state.pinned = state.pinned === index ? -1 : index;
      for (const other of els.caption.querySelectorAll(".word")) {
        other.setAttribute("aria-pressed", String(Number(other.dataset.index) === state.pinned));
      }
      showWord(index);
    });
    return button;
  }

  els.caption.addEventListener("keydown", (event) => {
    const words = Array.from(els.caption.querySelectorAll(".word"));
    const current = words.indexOf(document.activeElement);
    if (event.key === "Escape") {
      state.pinned = -1;
      words.forEach((word) => word.setAttribute("aria-pressed", "false"));
      showWord(-1);
      event.preventDefault();
    } else if (current >= 0 && (event.key === "ArrowRight" || event.key === "ArrowLeft")) {
      const next = current + (event.key === "ArrowRight" ? 1 : -1);
      if (next >= 0 && next < words.length) words[next].focus();
      event.preventDefault();
    } else if (current >= 0 && (event.key === "Home" || event.key === "End")) {
      words[event.key === "Home" ? 0 : words.length - 1].focus();
      event.preventDefault();
    }
  });

  // ----- attention overlay -----------------------------------------------------------------------

  function showWord(index) {
    const result = state.result;
    const valid = result && hasAttention(result) && index >= 0 && index < result.words.length;
    state.active = valid ? index : -1;
    for (const word of els.caption.querySelectorAll(".word")) {
      word.classList.toggle("active", Number(word.dataset.index) === state.active);
    }
    if (!valid) {
      delete els.caption.dataset.activeIndex;
      hideOverlay();
      return;
    }
    els.caption.dataset.activeIndex = String(index);
    drawAttention(index);
  }

  function hideOverlay() {
    els.overlay.hidden = true;
    for (const key of ["word", "wordIndex", "peakX", "peakY"]) delete els.overlay.dataset[key];
    els.attentionLabel.textContent = "";
  }

  function redraw() {
    if (state.active >= 0) drawAttention(state.active);
  }

  // Draws word `index`'s grid into a canvas of h x w pixels (one per grid cell), then scales that
  // up over the part of the image the encoder saw, with image smoothing (bilinear): where the model
  // looked stays bright, the rest is veiled in proportion to how little attention it got.
  function drawAttention(index) {
    const result = state.result;
    const grid = result.attention[index];
    const rows = grid.length;
    const cols = rows ? grid[0].length : 0;
    if (!rows || !cols) return hideOverlay();

    let low = Infinity;
    let high = -Infinity;
    let peakRow = 0;
    let peakCol = 0;
    for (let r = 0; r < rows; r += 1) {
      for (let c = 0; c < cols; c += 1) {
        const value = grid[r][c];
        if (value < low) low = value;
        if (value > high) {
          high = value;
          peakRow = r;
          peakCol = c;
        }
      }
    }
    const range = high - low;

    const cells = document.createElement("canvas");
    cells.width = cols;
    cells.height = rows;
    const cellContext = cells.getContext("2d");
    const pixels = cellContext.createImageData(cols, rows);
    for (let r = 0; r < rows; r += 1) {
      for (let c = 0; c < cols; c += 1) {
        const weight = range > 1e-12 ? (grid[r][c] - low) / range : 1; // 1: the most attended cell
        const offset = (r * cols + c) * 4;
        pixels.data[offset] = VEIL[0];
        pixels.data[offset + 1] = VEIL[1];
        pixels.data[offset + 2] = VEIL[2];
        pixels.data[offset + 3] = Math.round(255 * VEIL_OPACITY * (1 - weight));
      }
    }
    cellContext.putImageData(pixels, 0, 0);

    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(els.preview.clientWidth * ratio));
    const height = Math.max(1, Math.round(els.preview.clientHeight * ratio));
    const overlay = els.overlay;
    if (overlay.width !== width) overlay.width = width;
    if (overlay.height !== height) overlay.height = height;
    const context = overlay.getContext("2d");
    context.clearRect(0, 0, width, height);

    // The picture inside the <img> box (object-fit: contain may letterbox it) ...
    const naturalWidth = els.preview.naturalWidth || result.width;
    const naturalHeight = els.preview.naturalHeight || result.height;
    const scale = Math.min(width / naturalWidth, height / naturalHeight);
    const shownWidth = naturalWidth * scale;
    const shownHeight = naturalHeight * scale;
    const left = (width - shownWidth) / 2;
    const top = (height - shownHeight) / 2;
    // ... and the part of it the encoder saw (all of it, unless the model centre-crops).
    const region = result.attention_region || { left: 0, top: 0, right: 1, bottom: 1 };
    const x0 = left + region.left * shownWidth;
    const y0 = top + region.top * shownHeight;
    const x1 = left + region.right * shownWidth;
    const y1 = top + region.bottom * shownHeight;
    context.fillStyle = `rgba(${VEIL.join(",")}, ${VEIL_OPACITY})`;
    context.fillRect(left, top, shownWidth, shownHeight); // outside the encoder's view nothing was looked at
    context.clearRect(x0, y0, x1 - x0, y1 - y0);
    context.imageSmoothingEnabled = true;
    context.imageSmoothingQuality = "high";
    context.drawImage(cells, x0, y0, x1 - x0, y1 - y0);

    const word = result.words[index];
    overlay.dataset.word = word;
    overlay.dataset.wordIndex = String(index);
    overlay.dataset.peakX = (region.left + ((peakCol + 0.5) / cols) * (region.right - region.left)).toFixed(4);
    overlay.dataset.peakY = (region.top + ((peakRow + 0.5) / rows) * (region.bottom - region.top)).toFixed(4);
    overlay.hidden = false;
    els.attentionLabel.textContent = `“${word}”, word ${index + 1} of ${result.words.length}: bright where the model looked`;
  }

  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => redraw()).observe(els.preview);
  } else {
    window.addEventListener("resize", redraw);
  }

  loadInfo();
})();
