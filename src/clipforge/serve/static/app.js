// clipforge search page: plain JavaScript, no build step, no network beyond this server.
// Renders one page of results at a time (PER_PAGE cards), so a 100k-item collection costs no more than 10 items.
"use strict";

const PER_PAGE = 24;
const $ = (id) => document.getElementById(id);

// What the current result list was asked for: {kind: "text", q} | {kind: "image", file} | {kind: "like", id}.
let query = null;
let page = 0;
let lastImage = null; // {file} or {id}: what the classify and moderation panels use when given no file
let searchSeq = 0; // only the newest search may render: options changed quickly start overlapping requests

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const res = await fetch(path, options);
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

async function loadInfo() {
  try {
    const info = await api("/api/info");
    setStatus($("status"), `${info.items.toLocaleString()} items · model ${info.model} · ${info.dim}-d · index ${info.index}`);
    if (!info.moderation) {
      $("moderate-button").disabled = true;
      setStatus($("moderate-result"), "No moderation policy is configured on this server.");
    }
  } catch (e) {
    setStatus($("status"), `Cannot reach the server: ${e.message}`, true);
  }
}

// The search options the page's controls set, in the API's names (shared by every kind of query).
function searchOptions() {
  const o = { sort: $("sort").value };
  if ($("only-relevant").checked) o.min_relevance = Number($("min-relevance").value);
  if ($("after").value) o.after = $("after").value;
  // "Taken until" a day includes that day: the API's bound is exclusive, so ask for before the next midnight.
  if ($("before").value) o.before = nextDay($("before").value);
  return o;
}

function nextDay(isoDate) {
  const d = new Date(`${isoDate}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + 1);
  return d.toISOString().slice(0, 10);
}

function postJSON(body) {
  return api("/api/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

function searchRequest(offset) {
  const k = PER_PAGE + 1; // one extra tells whether a next page exists
  const options = searchOptions();
  if (query.kind === "text") {
    const mode = $("mode").value; // "": the server's choice (hybrid where the collection has words)
    return postJSON({ text: query.q, k, offset, ...options, ...(mode ? { mode } : {}) });
  }
  if (query.kind === "image") {
    const form = new FormData();
    form.append("image", query.file);
    for (const [name, value] of Object.entries({ k, offset, ...options })) form.append(name, value);
    return api("/api/search", { method: "POST", body: form });
  }
  return postJSON({ like: query.id, k, offset, ...options });
}

async function runSearch(newQuery, newPage = 0) {
  if (newQuery) query = newQuery;
  if (!query) return;
  page = newPage;
  const ticket = ++searchSeq;
  setStatus($("summary"), "Searching…");
  try {
    const res = await searchRequest(page * PER_PAGE);
    if (ticket !== searchSeq) return;
    const shown = res.results.slice(0, PER_PAGE);
    render(shown);
    const what = query.kind === "text" ? `“${query.q}”` : query.kind === "image" ? "your image" : `item ${query.id}`;
    const none = $("only-relevant").checked ? `No relevant results for ${what}.` : `No results for ${what}.`;
    setStatus($("summary"), shown.length
      ? `Results ${page * PER_PAGE + 1}–${page * PER_PAGE + shown.length} for ${what} (${res.took_ms.toFixed(0)} ms)`
      : none);
    $("prev").disabled = page === 0;
    $("next").disabled = res.results.length <= PER_PAGE;
    $("page-label").textContent = `Page ${page + 1}`;
  } catch (e) {
    if (ticket !== searchSeq) return;
    render([]);
    setStatus($("summary"), e.message, true);
  }
}

function clock(seconds) {
  const s = Math.floor(seconds);
  const hms = [Math.floor(s / 3600), Math.floor(s / 60) % 60, s % 60];
  const text = hms.map((x) => String(x).padStart(2, "0")).join(":");
  return hms[0] ? text : text.slice(3).replace(/^0/, "");
}

// A moment of a video: the video itself, opened at the moment (the #t= media fragment; currentTime as well,
// for a browser that ignores the fragment), with the frame as its poster until it loads.
function momentVideo(hit, label) {
  const video = document.createElement("video");
  video.className = "thumb";
  video.controls = true;
  video.muted = true;
  video.preload = "metadata";
  video.poster = hit.thumb_url;
  video.src = `${hit.video_url}#t=${hit.t}`;
  video.dataset.t = hit.t;
  video.setAttribute("aria-label", `${label} at ${clock(hit.t)}`);
  video.addEventListener("loadedmetadata", () => {
    if (Math.abs(video.currentTime - hit.t) > 0.05) video.currentTime = hit.t;
  });
  return video;
}

function render(hits) {
  const list = $("results");
  const frag = document.createDocumentFragment();
  const tpl = $("card").content;
  hits.forEach((hit, i) => {
    const card = tpl.cloneNode(true);
    const li = card.querySelector("li");
    li.dataset.id = hit.id;
    li.dataset.rank = i;
    const taken = hit.metadata && hit.metadata.taken_at;
    if (taken) li.dataset.taken = taken;
    let label = hit.caption || hit.name || `item ${hit.id}`;
    const thumbButton = card.querySelector(".thumb-button");
    if (hit.video_url) {
      label = `${hit.name} at ${clock(hit.t)}`;
      thumbButton.replaceWith(momentVideo(hit, hit.name));
    } else if (hit.thumb_url) {
      const img = card.querySelector(".thumb");
      img.src = hit.thumb_url;
      img.alt = label;
      thumbButton.addEventListener("click", () => window.open(hit.image_url, "_blank", "noopener"));
      thumbButton.setAttribute("aria-label", `Open full image: ${label}`);
    } else {
      const text = document.createElement("div");
      text.className = "text-item";
      text.textContent = hit.caption || "(text item)";
      thumbButton.replaceWith(text);
    }
    card.querySelector(".score").textContent = `score ${hit.score.toFixed(3)}`;
    // No estimate (a collection too small to judge by) shows nothing rather than a made-up number.
    card.querySelector(".relevance").textContent = hit.relevance == null ? "" : `relevance ${hit.relevance.toFixed(2)}`;
    card.querySelector(".caption").textContent = label;
    card.querySelector(".caption").title = label;
    card.querySelector(".date").textContent = taken ? `taken ${taken.slice(0, 10)}` : "";
    const like = card.querySelector(".like");
    like.setAttribute("aria-label", `More like ${label}`);
    like.addEventListener("click", () => {
      lastImage = hit.thumb_url ? { id: hit.id } : lastImage;
      runSearch({ kind: "like", id: hit.id });
    });
    frag.appendChild(card);
  });
  list.replaceChildren(frag);
}

function searchByFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus($("summary"), `${file.name} is not an image.`, true);
    return;
  }
  const preview = $("query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = `Query image ${file.name}`;
  preview.hidden = false;
  lastImage = { file };
  runSearch({ kind: "image", file });
}

// ---- classify and moderate -----------------------------------------------------------------------
function imageSource() {
  const picked = $("classify-image").files[0];
  return picked ? { file: picked } : lastImage;
}

function imageRequest(source, fields) {
  if (source.file) {
    const form = new FormData();
    form.append("image", source.file);
    for (const [k, v] of Object.entries(fields)) form.append(k, typeof v === "string" ? v : JSON.stringify(v));
    return { method: "POST", body: form };
  }
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id: source.id, ...fields }) };
}

function describe(source) {
  return source.file ? `Image: ${source.file.name}` : `Image: item ${source.id}`;
}

async function classify(event) {
  event.preventDefault();
  const out = $("classify-result");
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  const source = imageSource();
  if (!labels.length) return setStatus(out, "Type at least one label.", true);
  if (!source) return setStatus(out, "Choose an image, search by image, or click “More like this” first.", true);
  $("classify-source").textContent = describe(source);
  setStatus(out, "Classifying…");
  try {
    const res = await api("/api/classify", imageRequest(source, { labels }));
    out.classList.remove("error");
    out.replaceChildren(...res.predictions.map(barRow));
  } catch (e) {
    setStatus(out, e.message, true);
  }
}

function barRow(p) {
  const row = document.createElement("div");
  row.className = "bar-row";
  row.setAttribute("role", "img");
  const pct = (100 * p.probability).toFixed(1);
  row.setAttribute("aria-label", `${p.label}: ${pct} percent`);
  const name = document.createElement("span");
  name.className = "bar-label";
  name.textContent = p.label;
  name.title = p.label;
  const track = document.createElement("span");
  track.className = "bar-track";
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.display = "block";
  fill.style.width = `${Math.max(0, Math.min(100, 100 * p.probability))}%`;
  track.appendChild(fill);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = `${pct}%`;
  row.append(name, track, value);
  return row;
}

async function moderate() {
  const out = $("moderate-result");
  const source = imageSource();
  if (!source) return setStatus(out, "Choose an image, search by image, or click “More like this” first.", true);
  setStatus(out, "Checking…");
  try {
    const res = await api("/api/moderate", imageRequest(source, {}));
    const decision = document.createElement("p");
    decision.innerHTML = "Decision: ";
    const tag = document.createElement("span");
    tag.className = `decision ${res.decision}`;
    tag.textContent = res.decision;
    decision.appendChild(tag);
    const rows = (res.categories || []).map((c) => barRow({ label: `${c.name} (${c.decision})`, probability: c.score }));
    const bars = document.createElement("div");
    bars.className = "bars";
    bars.replaceChildren(...rows);
    out.classList.remove("error");
    out.replaceChildren(decision, bars);
  } catch (e) {
    setStatus(out, e.message, true);
  }
}

// ---- wiring --------------------------------------------------------------------------------------
function init() {
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("q").value.trim();
    if (q) runSearch({ kind: "text", q });
  });
  $("image-input").addEventListener("change", (e) => searchByFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    searchByFile(e.dataTransfer.files[0]);
  });
  // A changed option runs the current search again, from its first page.
  const rerun = () => runSearch(null, 0);
  $("only-relevant").addEventListener("change", () => {
    $("min-relevance").disabled = !$("only-relevant").checked;
    rerun();
  });
  $("min-relevance").addEventListener("input", () => {
    $("min-relevance-value").textContent = Number($("min-relevance").value).toFixed(2);
  });
  for (const id of ["min-relevance", "mode", "after", "before", "sort"]) $(id).addEventListener("change", rerun);
  $("prev").addEventListener("click", () => runSearch(null, Math.max(0, page - 1)));
  $("next").addEventListener("click", () => runSearch(null, page + 1));
  $("classify-form").addEventListener("submit", classify);
  $("moderate-button").addEventListener("click", moderate);
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
