// The vitlab serve page: choose or drop images, see the top-5 classes as bars and the attention-rollout overlay,
// with the model card beside them. Plain JavaScript against the server's own API; nothing is loaded from elsewhere.
"use strict";

const state = { key: null, card: null };
const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  return fetch(path, Object.assign({}, options, { headers }));
}

async function errorText(response) {
  try { return (await response.json()).error || response.statusText; } catch (e) { return response.statusText; }
}

function renderCard(card) {
  $("model-name").textContent = "· " + card.name;
  const rows = [
    ["model", card.name],
    ["architecture", card.architecture],
    ["source", card.source || "(in memory)"],
    ["backend", card.backend + (card.quantization ? " (" + card.quantization + ")" : "")],
    ["device", card.device],
    ["parameters", card.parameters === null ? "n/a" : card.parameters.toLocaleString("en")],
    ["input", card.in_chans + " x " + card.img_size.join(" x ")],
    ["patch", card.patch_size ? card.patch_size.join(" x ") : "n/a"],
    ["classes", card.zero_shot ? "zero-shot: named per request (" + card.zero_shot.templates.join(" | ") + ")"
                               : String(card.num_classes)],
    ["preprocessing", describePreprocessing(card.preprocessing)],
    ["attention rollout", card.explain ? "yes (from the " + card.rollout_source + " token" +
                                         (card.rollout_source === "mean" ? "s" : "") + ")" : "no"],
    ["limits", card.limits.max_images + " images, " + (card.limits.max_body_bytes / 1048576).toFixed(1) +
               " MiB per request; batches of " + card.limits.max_batch + " within " + card.limits.max_wait_ms +
               " ms"],
  ];
  const table = el("table");
  for (const [name, value] of rows) {
    const tr = el("tr");
    tr.append(el("td", "", name), el("td", "", value));
    table.append(tr);
  }
  $("card-body").replaceChildren(table);
  if (card.class_names) $("card-body").append(classList(card.class_names));
}

// all the class names, folded away until asked for (a thousand names would otherwise fill the card)
function classList(names) {
  const details = el("details");
  const summary = el("summary", "", "class names (" + names.length.toLocaleString("en") + ")");
  const list = el("div", "", names.join(", "));
  list.id = "class-names";
  details.append(summary, list);
  return details;
}

function describePreprocessing(p) {
  const resize = p.resize === "crop" ? "resize + centre crop (" + p.crop_pct + ")" : "squash";
  return p.img_size.join("x") + ", " + resize + ", " + p.interpolation + ", mean " + p.mean.join("/") +
         ", std " + p.std.join("/") + (p.channels === 1 ? ", grey" : "");
}

async function loadCard() {
  const response = await api("/v1/model");
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("key-message").textContent = await errorText(response);
    $("card-body").textContent = "needs the API key";
    return false;
  }
  if (!response.ok) {
    $("card-body").textContent = "error: " + await errorText(response);
    return false;
  }
  state.card = await response.json();
  $("key-form").hidden = true;
  if (state.card.zero_shot) {  // an image-text model: the classes are named here, per request
    $("labels-form").hidden = false;
    if (!$("labels").value && state.card.class_names) $("labels").value = state.card.class_names.join(", ");
  }
  renderCard(state.card);
  return true;
}

function renderTop(container, top) {
  container.replaceChildren();
  for (const entry of top) {
    const row = el("div", "bar-row");
    const track = el("div", "track");
    const fill = el("div", "fill");
    fill.style.width = (100 * entry.probability).toFixed(2) + "%";
    track.append(fill);
    row.title = entry["class"] + " (class " + entry.index + ")";
    row.append(el("span", "label", entry["class"]), track,
               el("span", "pct", (100 * entry.probability).toFixed(1) + "%"));
    container.append(row);
  }
}

async function predict(file) {
  const result = el("div", "result");
  const original = el("figure");
  const picture = el("img");
  picture.alt = "input";
  picture.onerror = () => { original.classList.add("unreadable"); };  // the browser cannot show it either
  picture.src = URL.createObjectURL(file);
  original.append(picture, el("figcaption", "", file.name));
  const overlay = el("figure", "overlay");
  const overlayImage = el("img");
  overlayImage.alt = "attention overlay";
  overlay.append(overlayImage, el("figcaption", "", "attention rollout"));
  const top = el("div", "top");
  top.append(el("div", "status", "predicting…"));
  result.append(original, overlay, top);
  $("results").prepend(result);

  const explain = !state.card || state.card.explain;
  if (!explain) overlay.hidden = true;
  const body = new FormData();
  body.append("image", file, file.name);
  body.append("top_k", "5");
  if (state.card && state.card.zero_shot && $("labels").value.trim()) body.append("labels", $("labels").value);
  let response;
  try {
    response = await api(explain ? "/v1/explain" : "/v1/classify", { method: "POST", body });
  } catch (e) {
    top.replaceChildren(el("div", "error", "request failed: " + e));
    return;
  }
  if (!response.ok) {
    top.replaceChildren(el("div", "error", response.status + ": " + await errorText(response)));
    overlay.hidden = true;
    result.classList.add("failed");
    return;
  }
  const answer = await response.json();
  const item = answer.results[0];
  renderTop(top, item.top);
  top.append(el("div", "meta", answer.model + " · " + answer.time_ms.toFixed(1) + " ms on the server"));
  if (item.rollout) {
    await new Promise((resolve) => {
      overlayImage.onload = resolve;
      overlayImage.onerror = resolve;
      overlayImage.src = "data:image/png;base64," + item.rollout.overlay_png;
    });
  }
  result.classList.add("done");
}

function handleFiles(files) {
  const limit = state.card ? state.card.limits.max_images : 16;
  Array.from(files).slice(0, limit).forEach((file) => { predict(file); });
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => { handleFiles(event.target.files); event.target.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => { event.preventDefault(); handleFiles(event.dataTransfer.files); });
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    state.key = $("key").value;
    await loadCard();
  });
  loadCard();
}

setUp();
