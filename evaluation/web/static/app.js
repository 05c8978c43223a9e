// The page's logic: upload, protect, follow the progress, show the results. Text from the server or from file
// names is only ever set as textContent.
"use strict";

const API = { "X-Facelock": "1" };
let session = null;
let info = null;

function $(id) { return document.getElementById(id); }

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function showError(message) { $("errors").appendChild(element("li", message)); }
function showNote(message) { $("notes").appendChild(element("li", message)); }

async function call(method, url, body, headers) {
  let response;
  try {
    response = await fetch(url, { method, body, headers: { ...API, ...(headers || {}) } });
  } catch (error) {
    throw new Error("the page's server cannot be reached (was it stopped?)");
  }
  let data = {};
  try { data = await response.json(); } catch (error) { data = {}; }
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function budgetLabel() {
  const levels = Number($("budget").value);
  $("budget-label").textContent = `${levels} of ${$("budget").max}: each colour of a pixel moves by at most ` +
    `${levels} of its 255 steps`;
}

async function start() {
  budgetLabel();
  $("budget").addEventListener("input", budgetLabel);
  $("protect").addEventListener("click", () => protect().catch((error) => { showError(error.message); done(); }));
  try {
    info = await call("GET", "/api/info");
  } catch (error) { showError(error.message); return; }
  const limits = info.limits;
  $("limits").textContent = `(up to ${limits.max_files} photos, ${limits.max_upload_mb} MB and ` +
    `${limits.max_megapixels} megapixels each; JPEG, PNG, HEIC, WebP, ...)`;
  $("budget").max = info.budget.max;
  $("budget").value = info.budget.default;
  budgetLabel();
  for (const [name, preset] of Object.entries(info.presets)) {
    const option = element("option", preset.summary);
    option.value = name;
    option.selected = name === info.default_preset;
    $("preset").appendChild(option);
    const list = $("models");
    list.appendChild(element("dt", `${name} (on ${info.device})`));
    list.appendChild(element("dd", `autoencoder attacked: ${preset.autoencoder}; face model attacked: ` +
      `${preset.face_model}; LPIPS: ${preset.lpips}; ${preset.iterations} iterations at up to ` +
      `${preset.max_size} px; verdicts by ${preset.judge}; edit: ${preset.editor}`));
  }
}

function done() { $("protect").disabled = false; }

async function protect() {
  for (const id of ["errors", "notes", "results", "archive"]) $(id).replaceChildren();
  $("status").classList.remove("failed");
  const files = Array.from($("files").files);
  if (!files.length) { showError("choose one or more photos first"); return; }
  $("protect").disabled = true;
  if (!session) session = (await call("POST", "/api/session")).session;
  const ids = [];
  for (const file of files) {
    if (file.size > info.limits.max_upload_mb * 1e6) {
      showError(`${file.name} is too large (${(file.size / 1e6).toFixed(1)} MB); the page takes photos up to ` +
        `${info.limits.max_upload_mb} MB`);
      continue;
    }
    try {
      const photo = await call("POST", `/api/upload?session=${encodeURIComponent(session)}`, file,
        { "X-File-Name": encodeURIComponent(file.name), "Content-Type": "application/octet-stream" });
      ids.push(photo.id);
      for (const note of photo.notes || []) showNote(`${photo.name}: ${note}`);
    } catch (error) { showError(error.message); }
  }
  if (!ids.length) { done(); return; }
  const request = { session, photos: ids, levels: Number($("budget").value), preset: $("preset").value };
  const job = (await call("POST", "/api/protect", JSON.stringify(request),
    { "Content-Type": "application/json" })).job;
  $("status").hidden = false;
  await follow(job);
}

async function follow(job) {
  for (;;) {
    const status = await call("GET", `/api/job?session=${encodeURIComponent(session)}&job=${job}`);
    $("progress").value = status.fraction;
    const left = status.seconds_left;
    $("stage").textContent = left === null || left === undefined ? status.stage :
      `${status.stage} (about ${left < 90 ? `${Math.max(left, 1)} s` : `${Math.round(left / 60)} min`} left)`;
    if (status.state === "done" || status.state === "failed") {
      if (status.state === "failed") $("status").classList.add("failed");
      show(status); done(); return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function fileUrl(name, download) {
  const url = `/files/${encodeURIComponent(session)}/${encodeURIComponent(name)}`;
  return download ? `${url}?download=${encodeURIComponent(download)}` : url;
}

function figure(src, caption) {
  const node = element("figure");
  const image = element("img");
  image.src = src;
  image.alt = caption;
  node.append(image, element("figcaption", caption));
  return node;
}

function show(status) {
  if (status.archive) {
    const link = element("a", "Download all protected photos (zip)");
    link.href = fileUrl(status.archive, "protected_photos.zip");
    link.id = "archive-link";
    link.download = "protected_photos.zip";
    $("archive").replaceChildren(link);
  }
  for (const result of status.results) {
    if (result.error) { showError(result.error); continue; }
    const card = element("section", null, "result");
    card.appendChild(element("h2", result.name));
    const report = result.report;
    const images = element("div", null, "images");
    images.append(figure(fileUrl(result.original), "original"),
      figure(fileUrl(result.protected), `protected (largest change ${result.linf_255}/255, PSNR ${result.psnr} dB)`),
      figure(fileUrl(result.difference), `difference x${result.difference_gain} (grey: unchanged)`));
    card.appendChild(images);
    card.appendChild(element("p", result.conclusion, "conclusion"));
    if (result.next_step) card.appendChild(element("p", result.next_step, "next"));
    if (report) card.appendChild(verdicts(report, result.judges_in_words || []));
    const link = element("a", `Download ${result.download}`, "download");
    link.href = fileUrl(result.protected, result.download);
    link.download = result.download;
    card.appendChild(link);
    $("results").appendChild(card);
  }
}

function verdicts(report, judges) {
  const part = element("div");
  const table = element("table", null, "verdicts");
  const head = element("tr");
  head.append(element("th", "shared"), element("th", "face model"), element("th", "similarity"),
    element("th", "verdict"));
  table.appendChild(head);
  for (const row of report.results) {
    const line = element("tr");
    const verdict = element("td", row.verdict, row.recognised === false ? "yes verdict" :
      (row.recognised ? "no verdict" : "verdict"));
    line.append(element("td", row.sharing), element("td", row.judge),
      element("td", row.similarity === null ? "n/a" : row.similarity.toFixed(3)), verdict);
    table.appendChild(line);
  }
  part.appendChild(table);
  for (const words of judges) part.appendChild(element("p", words, "hint"));
  return part;
}

window.addEventListener("pagehide", () => {
  if (session) navigator.sendBeacon(`/api/end?session=${encodeURIComponent(session)}`);
});
start();
