/* CT triage screen. Fed by Server-Sent Events from `ctriage display` (/events): a snapshot on every (re)connect,
   then study / remove / device / link / ping events. Payload values are only ever set as text (never as HTML). */
"use strict";
(() => {
  const PING_MS = 5000;            // the server pings this often; silence for 3 pings means the link is dead
  const IDLE_MS = 60000;           // untouched this long with an unseen positive out of view: back to the top
  const OPEN_MS = 30000;           // a tile's expanded detail (full where-line, correction) folds back after this
  const FLASH_MS = 1800;           // how long a tile brought into view by the banner is highlighted
  const LIGHTBOX_MS = 45000;       // an enlarged key image left untouched this long closes (the queue is beneath)
  const FLAGS = {
    positive: { word: "POSITIVE", action: "ISOLATE NOW", icon: "i-positive" },
    negative: { word: "NEGATIVE", action: "no COVID-19 pattern found", icon: "i-negative" },
    pending: { word: "ANALYSING", action: "scan in progress — wait for result", icon: "i-pending" },
    indeterminate: { word: "INDETERMINATE", action: "review the scan", icon: "i-indeterminate" },
  };
  const QUAD_CLASS = { "upper-left": "ul", "upper-right": "ur", "lower-left": "ll", "lower-right": "lr" };
  const G = window.CTriageGrade;   // grade.js: the pattern grade, zone figure and solid lesions of a verdict

  const studies = new Map();       // id -> study (as sent by the server)
  const tiles = new Map();         // id -> tile element
  const devices = new Map();       // device -> device status
  const clicking = new Set();      // ids whose "seen" request is in flight
  const failed = new Map();        // id -> time an ack request failed
  const positivesKnown = new Set(); // ids already known as positive (for the chime)
  let link = { connected: false, broker: "", error: "connecting" };
  let config = { sound: false, expire_minutes: 720, name: "" };
  let offset = 0;                  // server clock - our clock (ms)
  let conn = "connecting";         // connecting | live | reconnecting
  let es = null, lastMsg = 0, retryMs = 1000, retryTimer = null, firstSnapshot = true, order = "";
  let cycleAt = null;              // the unseen positive the banner brought into view last
  let lastInput = Date.now();      // last touch / key / wheel on this screen
  let lightboxFor = null;          // id of the study whose key image is enlarged

  const $ = (sel, root = document) => root.querySelector(sel);
  const now = () => Date.now() + offset;

  // ---- connection --------------------------------------------------------------------------------------------
  function connect() {
    clearTimeout(retryTimer);
    if (es) es.close();
    es = new EventSource("/events");
    const on = (name, fn) => es.addEventListener(name, (ev) => {
      lastMsg = Date.now();
      let data;
      try { data = JSON.parse(ev.data); } catch (e) { return; }
      fn(data);
    });
    on("snapshot", onSnapshot);
    on("study", (s) => { upsert(s); render(); });
    on("remove", (r) => { studies.delete(r.id); render(); });
    on("device", (d) => { devices.set(d.device, d); render(); });
    on("link", (l) => { link = l; render(); });
    on("ping", (p) => syncClock(p.server_time));
    es.onerror = () => lost();
  }

  function lost() {
    if (es) { es.close(); es = null; }
    setConn("reconnecting");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, retryMs);
    retryMs = Math.min(Math.round(retryMs * 1.5), 5000);
  }

  function onSnapshot(snap) {
    config = Object.assign(config, snap.config || {});
    syncClock(snap.server_time);
    studies.clear();
    devices.clear();
    for (const d of snap.devices || []) devices.set(d.device, d);
    for (const s of snap.studies || []) upsert(s, firstSnapshot);
    link = snap.link || link;
    firstSnapshot = false;
    retryMs = 1000;
    const mins = config.expire_minutes;
    $("#expire-text").textContent = mins % 60 === 0 ? mins / 60 + " h" : mins + " min";
    $("#screen-name").textContent = config.name ? "Screen: " + config.name : "";
    setConn("live");
    render();
  }

  function syncClock(serverTime) {
    const t = Date.parse(serverTime);
    if (!Number.isNaN(t)) offset = t - Date.now();
  }

  function setConn(state) {
    conn = state;
    document.body.classList.remove("conn-connecting", "conn-live", "conn-reconnecting");
    document.body.classList.add("conn-" + state);
    $("#live-text").textContent = state === "live" ? "LIVE" : state === "reconnecting" ? "RECONNECTING" : "CONNECTING";
    renderBanner();
    renderDevices();
  }

  setInterval(() => {  // a silent connection (server gone without closing) is treated as lost
    if (conn === "live" && Date.now() - lastMsg > 3 * PING_MS) lost();
  }, 1000);

  // ---- state -------------------------------------------------------------------------------------------------
  function upsert(s, quiet = false) {
    const wasPositive = positivesKnown.has(s.id);
    studies.set(s.id, s);
    if (s.flag === "positive") {
      positivesKnown.add(s.id);
      if (!wasPositive && !quiet && !s.acked) {
        chime();
        closeLightbox();  // a new positive is never hidden behind an enlarged image
      }
    } else {
      positivesKnown.delete(s.id);
    }
    if (s.acked || (s.ack && s.ack.pending)) failed.delete(s.id);
  }

  function expired(s) {
    const t = Date.parse(s.scanned || s.updated);
    return !Number.isNaN(t) && now() - t > config.expire_minutes * 60000;
  }

  function unseenPositive(s) {
    return s.flag === "positive" && !s.acked;
  }

  /* Unseen positives are pinned first, oldest-flagged first: the patient waiting longest to be isolated leads, and
     a new positive joins the end of the group instead of pushing the others (and the tile under a finger) along.
     Everything else follows newest scan first. */
  function sorted() {
    const t = (iso) => Date.parse(iso) || 0;
    const byId = (a, b) => (a.id < b.id ? -1 : 1);
    return [...studies.values()].filter((s) => !expired(s)).sort((a, b) => {
      const pa = unseenPositive(a), pb = unseenPositive(b);
      if (pa !== pb) return pa ? -1 : 1;
      if (pa) return (t(a.flag_since) - t(b.flag_since)) || byId(a, b);
      return (t(b.scanned) - t(a.scanned)) || byId(a, b);
    });
  }

  // ---- rendering ---------------------------------------------------------------------------------------------
  function icon(id, cls = "icon") {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", cls);
    svg.setAttribute("aria-hidden", "true");
    const use = document.createElementNS("http://www.w3.org/2000/svg", "use");
    use.setAttribute("href", "#" + id);
    svg.appendChild(use);
    return svg;
  }

  function setIcon(el, id) {
    if (el.dataset.icon === id) return;
    el.dataset.icon = id;
    el.replaceChildren(icon(id));
  }

  function hhmm(iso) {
    const t = new Date(iso);
    if (Number.isNaN(t.getTime())) return "--:--";
    return t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return "";
    const s = Math.max(0, Math.round((now() - t) / 1000));
    if (s < 45) return "just now";
    const m = Math.round(s / 60);
    if (m < 60) return m + " min ago";
    const h = Math.floor(m / 60);
    return h + " h " + String(m % 60).padStart(2, "0") + " min ago";
  }

  function render() {
    const list = sorted();
    const queue = $("#queue");
    const ids = new Set(list.map((s) => s.id));
    for (const [id, el] of tiles) if (!ids.has(id)) { el.remove(); tiles.delete(id); }
    for (const s of list) {
      let el = tiles.get(s.id);
      if (!el) {
        el = $("#tile-template").content.firstElementChild.cloneNode(true);
        el.dataset.id = s.id;
        $(".ack", el).addEventListener("click", () => ack(s.id));
        $(".key", el).addEventListener("click", () => openLightbox(s.id));
        for (const sel of [".where", ".corr-note", ".info", ".grade", ".others", ".extent", ".strip-noisy"]) {
          const part = $(sel, el);
          part.addEventListener("click", () => toggleOpen(el));
          part.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") toggleOpen(el); });
        }
        if (!firstSnapshot && conn === "live") {
          el.classList.add("new");  // once: a tile moved in the queue later must not replay its arrival
          setTimeout(() => el.classList.remove("new"), 1300);
        }
        tiles.set(s.id, el);
      }
      updateTile(el, s);
    }
    const newOrder = list.map((s) => s.id).join("|");
    if (newOrder !== order || queue.children.length !== list.length) {
      for (const s of list) queue.appendChild(tiles.get(s.id));
      order = newOrder;
    }
    $("#empty").classList.toggle("hidden", list.length > 0 || conn !== "live");
    renderDevices();
    renderUnseen(list);
    renderMore();
    renderBanner();
    if (lightboxFor && !studies.has(lightboxFor)) closeLightbox();
  }

  function updateTile(el, s) {
    const f = FLAGS[s.flag] || FLAGS.pending;
    const dev = devices.get(s.device);
    const offline = dev && dev.state === "offline";
    el.className = el.className.split(" ")
      .filter((c) => !/^(flag-|state-|unacked|device-offline|corrected)/.test(c)).join(" ");
    el.classList.add("flag-" + s.flag, "state-" + s.state);
    if (s.flag === "positive" && !s.acked) el.classList.add("unacked");
    if (offline) el.classList.add("device-offline");
    el.dataset.flag = s.flag;
    el.dataset.state = s.state;
    el.dataset.acked = String(!!s.acked);

    setIcon($(".flag-icon", el), f.icon);
    $(".flag-word", el).textContent = f.word;
    let action = G.action(s) || f.action;
    if (s.flag === "pending" && s.result === "negative") action = "no lesion run so far — wait";
    else if (s.flag === "negative" && s.focal) action = "radiologist to read";
    $(".flag-action", el).textContent = action;
    $(".flag-action", el).classList.toggle("long", action.length > 24);

    $(".strip-text", el).textContent = stripText(s);
    // a noisy scan (sharp kernel, low dose): lesion boxes are less reliable; the full note is in the tap detail
    const noisy = $(".strip-noisy", el);  // empty when not shown: the strip's text stays the state alone
    noisy.textContent = s.acquisition ? "⚠ NOISY" : "";
    noisy.classList.toggle("hidden", !s.acquisition);
    el.classList.toggle("noisy", !!s.acquisition);

    const note = $(".offline-note", el);
    note.classList.toggle("hidden", !offline);
    if (offline) {
      note.textContent = "⚠ " + (s.state === "final" ? "SCANNER OFFLINE" : "OFFLINE · won't update");
    }

    $(".room", el).textContent = s.device;
    $(".time", el).textContent = hhmm(s.scanned);
    $(".age", el).textContent = ago(s.scanned);
    const ident = $(".ident", el);
    if (s.labels && Object.keys(s.labels).length) {
      ident.classList.add("labels");
      ident.textContent = Object.values(s.labels).join(" · ");
    } else {
      ident.classList.remove("labels");
      const b = document.createElement("b");
      b.textContent = s.short;
      ident.replaceChildren("Study ", b);
    }

    renderWhere(el, s);
    G.renderGrade(el, s);
    G.renderOthers(el, s);
    const focal = !!(s.finding && s.finding.kind === "focal");
    const special = G.detail(s);
    const detail = $(".detail", el);
    detail.textContent = special || detailText(s);
    detail.classList.toggle("focal", focal || (!!special && !G.graded(s)));
    detail.classList.toggle("extent-total", !!special && G.graded(s));
    renderCorrection(el, s);
    $(".model", el).textContent = modelText(s);

    renderKey(el, s);
    renderInfo(el, s);
    renderAck(el, s);
  }

  function modelText(s) {
    return (s.bundles || []).length ? "model " + s.bundles.map((b) => b.name + " " + b.version).join(" · ") : "";
  }

  function stripText(s) {
    if (s.state === "corrected") {
      const was = s.correction && s.correction.previous_result;
      if (was && was === s.result) return "FINAL · UPDATED";  // the same result, with news (prone images)
      return "CORRECTED" + (was ? " — was " + String(was).toUpperCase() : "");
    }
    if (s.state === "final") {
      const n = (s.series || []).length;
      return "FINAL" + (n > 1 ? " · " + n + " series" : " · scan complete");
    }
    return s.flag === "positive" ? "PROVISIONAL · final follows" : "PROVISIONAL · scan arriving";
  }

  /* The where-line: the case rule's finding only (evidence of a positive, or the focal lesion a negative names),
     in patient terms as the server wrote it. One quadrant lit; the full text is in the title and on tap. */
  function renderWhere(el, s) {
    const where = $(".where", el), text = $(".where-text", el);
    const f = s.finding;
    where.classList.toggle("hidden", !f || G.graded(s));  // graded: the zone figure says where (the run on tap)
    where.classList.toggle("focal", !!f && f.kind === "focal");
    const lit = f ? QUAD_CLASS[f.quadrant] : null;
    for (const q of el.querySelectorAll(".quad .q")) q.classList.toggle("on", !!lit && q.classList.contains(lit));
    const full = s.where || "";
    if (text.textContent !== full) text.textContent = full;
    where.title = full;
    where.setAttribute("aria-label", full ? "where: " + full + " (tap for the full text)" : "");
  }

  function detailText(s) {
    const c = s.counts || {};
    const f = s.finding;
    if (s.flag === "indeterminate" && s.reason) return s.reason;
    if (f && f.kind === "evidence") return "lesion on " + f.run + " slices in a row";
    if (f) {  // a focal lesion the appliance named a mass (the same slices in `others`) reads as one
      const run = f.first_slice === f.last_slice ? "slice " + (f.first_slice + 1)
        : "slices " + (f.first_slice + 1) + "–" + (f.last_slice + 1);
      const mass = (s.others || []).some(o => o.kind === "mass" && o.where && o.where.endsWith(run));
      return (mass ? "solid mass" : "single focal lesion") + " · " + f.run + " slices";
    }
    if (c.slices !== undefined) {
      return c.slices + " slices" + (s.state === "provisional" ? " so far" : "") + " · "
        + (c.lesion_slices || 0) + " with lesion";
    }
    return "waiting for the verdict";
  }

  function renderCorrection(el, s) {
    const note = $(".corr-note", el), c = s.correction;
    el.classList.toggle("corrected", !!c);
    note.classList.toggle("hidden", !c);
    const text = c ? "⟲ " + (c.what || "result corrected") : "";
    if (note.textContent !== text) note.textContent = text;
    const when = c && c.previous_created ? " (earlier final " + hhmm(c.previous_created) + ")" : "";
    note.title = c ? (c.what || "") + when : "";
  }

  /* The tile's full detail, shown over its body on tap: the texts a tile line may have to ellipsise, whole. */
  function renderInfo(el, s) {
    const lines = G.infoLines(s);
    if (s.where) lines.push(["where", "Where: " + s.where]);
    const c = s.correction;
    if (c) {
      const when = c.previous_created ? " (earlier final " + hhmm(c.previous_created) + ")" : "";
      lines.push(["corr", stripText(s) + when + ": " + (c.what || "result corrected")]);
    }
    // a busy tile (graded, solid lesions, corrected) has no room for the model line: the detail's foot carries it
    const hidden = getComputedStyle($(".model", el)).display === "none";
    const hint = (hidden && modelText(s) ? modelText(s) + " · " : "") + "tap to close";
    lines.push(["hint", hint]);
    const key = JSON.stringify(lines);
    const info = $(".info", el);
    if (info.dataset.key === key) return;
    info.dataset.key = key;
    info.replaceChildren(...lines.map(([cls, text]) => {
      const p = document.createElement("p");
      p.className = "info-" + cls;
      p.textContent = text;
      return p;
    }));
  }

  function toggleOpen(el, open) {
    const on = el.classList.toggle("open", open);
    clearTimeout(el.openTimer);
    if (on) el.openTimer = setTimeout(() => el.classList.remove("open"), OPEN_MS);
  }

  function keyCaption(s) {
    if (s.key_slice === null || s.key_slice === undefined) return "";
    return "slice " + (s.key_slice + 1) + (s.key_of ? " of " + s.key_of : "");
  }

  /* The key image carries no burned-in words: its caption (slice N of M, state) is HTML over it; tap enlarges. */
  function renderKey(el, s) {
    const img = $(".key-img", el), canvas = $(".key-canvas", el), none = $(".key-none", el), btn = $(".key", el);
    const shown = s.image ? "image" : (s.boxes && s.boxes.length) ? "boxes" : "";
    btn.disabled = !shown;
    btn.setAttribute("aria-label", shown ? "key image: " + keyCaption(s) + " — tap to enlarge" : "no key image");
    $(".key-top", el).textContent = keyCaption(s);
    $(".key-top", el).classList.toggle("hidden", !shown || !keyCaption(s));
    $(".key-state", el).textContent = shown === "boxes" ? "BOXES ONLY" : String(s.key_state || s.state).toUpperCase();
    $(".key-bottom", el).classList.toggle("hidden", !shown);
    for (const b of el.querySelectorAll(".key-side")) b.classList.toggle("hidden", !shown);
    if (shown === "image") {
      if (img.getAttribute("src") !== s.image) img.setAttribute("src", s.image);
      img.classList.remove("hidden");
      canvas.classList.add("hidden");
      none.classList.add("hidden");
      return;
    }
    img.classList.add("hidden");
    img.removeAttribute("src");
    if (shown === "boxes") {
      const key = JSON.stringify(s.boxes);
      if (canvas.dataset.key !== key) { drawBoxes(canvas, s.boxes); canvas.dataset.key = key; }
      canvas.classList.remove("hidden");
      none.classList.add("hidden");
      return;
    }
    canvas.classList.add("hidden");
    none.classList.remove("hidden");
    none.textContent = s.flag === "negative"
      ? (s.focal ? "Key image pending" : (s.others || []).length ? "No key image" : "No lesion found")
      : s.flag === "pending" ? "Key image follows a finding"
      : s.flag === "positive" ? "Key image pending" : "No key image";
  }

  function drawBoxes(canvas, boxes) {
    const g = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
    g.fillStyle = "#000";
    g.fillRect(0, 0, W, H);
    g.strokeStyle = "#2f5d86";
    g.lineWidth = 2;
    g.setLineDash([12, 10]);
    g.beginPath(); g.moveTo(W / 2, 0); g.lineTo(W / 2, H); g.moveTo(0, H / 2); g.lineTo(W, H / 2); g.stroke();
    g.setLineDash([]);
    for (const b of boxes) {
      const [y0, x0, y1, x1] = b.box;
      g.strokeStyle = "#ff3fa8";
      g.lineWidth = 6;
      g.strokeRect(x0 * W, y0 * H, Math.max(4, (x1 - x0) * W), Math.max(4, (y1 - y0) * H));
    }
  }

  function renderAck(el, s) {
    const btn = $(".ack", el);
    btn.classList.remove("sending", "done", "changed");
    btn.disabled = false;
    let id = null, text;
    if (clicking.has(s.id)) {
      btn.classList.add("sending");
      text = "Sending…";
    } else if (s.ack && s.ack.pending) {
      btn.classList.add("sending");
      text = link.connected ? "SEEN — confirming…" : "SEEN — will send when the broker is back";
    } else if (s.acked) {
      btn.classList.add("done");
      btn.disabled = true;
      id = "i-seen";
      text = "SEEN " + hhmm(s.ack.created) + " · " + s.ack.seen_by;
    } else if (s.ack) {
      btn.classList.add("changed");
      id = "i-link";
      text = "RESULT CHANGED — tap when seen";
    } else if (failed.has(s.id)) {
      btn.classList.add("changed");
      text = "Not sent — tap again";
    } else {
      text = s.flag === "positive" ? "Tap to confirm SEEN" : "Tap when seen";
    }
    const key = (id || "") + "|" + text;
    if (btn.dataset.key !== key) {
      btn.dataset.key = key;
      btn.replaceChildren(...(id ? [icon(id)] : []), text);
    }
  }

  async function ack(id) {
    const s = studies.get(id);
    if (!s || s.acked || clicking.has(id)) return;
    clicking.add(id);
    failed.delete(id);
    render();
    try {
      const r = await fetch("/api/ack", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ device: s.device, study_key: s.study_key }) });
      if (!r.ok) throw new Error("HTTP " + r.status);
    } catch (e) {
      failed.set(id, Date.now());
    } finally {
      clicking.delete(id);
      render();
    }
  }

  function renderDevices() {
    const ul = $("#devices");
    const rank = { offline: 0, degraded: 1, updating: 1, unknown: 1, online: 2 };  // trouble first: always in view
    const list = [...devices.values()].sort((a, b) => ((rank[a.state] ?? 1) - (rank[b.state] ?? 1))
      || (a.device < b.device ? -1 : 1));
    const items = list.map((d) => {
      const li = document.createElement("li");
      const state = d.state || "unknown";
      li.className = "dev " + state;
      li.dataset.device = d.device;
      li.dataset.state = state;
      const stale = conn !== "live" || !link.connected;  // what we show is the last known state
      if (stale) li.classList.add("stale");
      const name = document.createElement("span");
      name.className = "dev-name";
      name.textContent = d.device;
      const st = document.createElement("span");
      st.className = "dev-state";
      st.textContent = state.toUpperCase() + (stale ? "?" : "");
      const seen = document.createElement("span");
      seen.className = "dev-seen";
      if (state === "offline") {
        seen.textContent = d.last_seen ? "last seen " + hhmm(d.last_seen) : "last seen: unknown";
      } else if (stale) {
        seen.textContent = "last known";
      }
      li.title = d.last_seen ? "last message " + hhmm(d.last_seen) : "";
      li.append(icon(state === "online" ? "i-online" : state === "offline" ? "i-offline" : "i-link"), name, st, seen);
      return li;
    });
    ul.replaceChildren(...items);
  }

  function renderUnseen(list) {
    const unseen = list.filter((s) => s.flag === "positive" && !s.acked);
    const btn = $("#unseen");
    btn.classList.toggle("hidden", unseen.length === 0);
    const text = unseen.length + " POSITIVE NOT YET SEEN";
    if (btn.dataset.text !== text) {
      btn.dataset.text = text;
      btn.replaceChildren(icon("i-positive"), text);
    }
  }

  /* Unseen positive tiles not fully in the queue's view, split by where they are: {above: [ids], below: [ids]}. */
  function offscreen() {
    const q = $("#queue").getBoundingClientRect();
    const out = { above: [], below: [] };
    for (const s of sorted().filter(unseenPositive)) {
      const el = tiles.get(s.id);
      if (!el) continue;
      const r = el.getBoundingClientRect();
      if (r.top < q.top - 1) out.above.push(s.id);
      else if (r.bottom > q.bottom + 1) out.below.push(s.id);
    }
    return out;
  }

  function renderMore() {
    const off = offscreen();
    setMore($("#more-below"), off.below.length, "▼ " + off.below.length + " MORE POSITIVE BELOW");
    setMore($("#more-above"), off.above.length, "▲ " + off.above.length + " MORE POSITIVE ABOVE");
  }

  function setMore(btn, n, text) {
    btn.classList.toggle("hidden", n === 0);
    btn.dataset.count = String(n);
    if (n && btn.textContent !== text) btn.textContent = text;
  }

  /* Bring an unseen positive into view: from a "more" pill, the nearest one that way; from the banner, the next one
     after the last shown (cycling), preferring one that is out of view. */
  function showUnseen(dir) {
    const ids = sorted().filter(unseenPositive).map((s) => s.id);
    if (!ids.length) return;
    const off = offscreen();
    let next;
    if (dir === "below") next = off.below[0];
    else if (dir === "above") next = off.above[off.above.length - 1];
    else {
      const start = ids.indexOf(cycleAt) + 1;
      const rotated = [...ids.slice(start), ...ids.slice(0, start)];
      next = rotated.find((id) => off.above.includes(id) || off.below.includes(id)) || rotated[0];
    }
    const el = next && tiles.get(next);
    if (!el) return;
    cycleAt = next;
    const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    el.scrollIntoView({ behavior: smooth ? "smooth" : "auto", block: "nearest" });
    for (const other of tiles.values()) other.classList.remove("flash");
    void el.offsetWidth;  // restart the highlight
    el.classList.add("flash");
    clearTimeout(el.flashTimer);
    el.flashTimer = setTimeout(() => el.classList.remove("flash"), FLASH_MS);
  }

  // ---- key image, enlarged -----------------------------------------------------------------------------------
  function openLightbox(id) {
    const s = studies.get(id), el = tiles.get(id);
    if (!s || !el) return;
    const canvas = $(".key-canvas", el);
    const src = s.image || (canvas.classList.contains("hidden") ? "" : canvas.toDataURL("image/png"));
    if (!src) return;
    $("#lightbox-img").setAttribute("src", src);
    const state = s.image ? String(s.key_state || s.state).toUpperCase() : "lesion boxes only (no key image)";
    $("#lightbox-cap").textContent = [s.device, "Study " + s.short, keyCaption(s), state, s.where]
      .filter(Boolean).join(" · ");
    $("#lightbox").classList.remove("hidden");
    lightboxFor = id;
  }

  function closeLightbox() {
    $("#lightbox").classList.add("hidden");
    $("#lightbox-img").removeAttribute("src");
    lightboxFor = null;
  }

  function renderBanner() {
    const banner = $("#banner");
    let text = "";
    if (conn === "reconnecting") text = "Reconnecting to the display server… results shown may be out of date";
    else if (conn === "connecting") text = "Connecting to the display server…";
    else if (!link.connected) text = "Broker link lost — reconnecting… results shown may be out of date";
    document.body.classList.toggle("link-down", conn === "live" && !link.connected);
    banner.classList.toggle("hidden", !text);
    banner.dataset.kind = conn !== "live" ? "server" : !link.connected ? "broker" : "";
    if ($("#banner-text").textContent !== text) $("#banner-text").textContent = text;
    const ic = $(".banner-icon");
    if (!ic.firstChild) ic.appendChild(icon("i-link"));
  }

  // ---- sound ---------------------------------------------------------------------------------------------------
  let audio = null;
  function chime() {
    if (!config.sound) return;
    try {
      audio = audio || new (window.AudioContext || window.webkitAudioContext)();
      const t0 = audio.currentTime;
      [0, 0.28, 0.56].forEach((dt, i) => {
        const o = audio.createOscillator(), g = audio.createGain();
        o.type = "sine";
        o.frequency.value = i === 1 ? 988 : 784;
        g.gain.setValueAtTime(0.0001, t0 + dt);
        g.gain.exponentialRampToValueAtTime(0.4, t0 + dt + 0.02);
        g.gain.exponentialRampToValueAtTime(0.0001, t0 + dt + 0.24);
        o.connect(g).connect(audio.destination);
        o.start(t0 + dt);
        o.stop(t0 + dt + 0.25);
      });
      document.body.dataset.chimes = String(Number(document.body.dataset.chimes || 0) + 1);
    } catch (e) { /* no audio device: the screen still shows the positive */ }
  }

  // ---- clock and ages ----------------------------------------------------------------------------------------
  function tick() {
    const t = new Date(now());
    $("#clock").textContent = t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit",
      hourCycle: "h23" });
    for (const [id, el] of tiles) {
      const s = studies.get(id);
      if (s) $(".age", el).textContent = ago(s.scanned);
    }
    if ([...studies.values()].some(expired)) render();
    else { renderDevices(); renderMore(); }
    returnWhenIdle();
  }

  /* Nobody has touched the screen for a while and an unseen positive is out of view: show the top again. */
  function returnWhenIdle() {
    const q = $("#queue");
    if (lightboxFor && Date.now() - lastInput >= LIGHTBOX_MS) closeLightbox();
    if (Date.now() - lastInput < IDLE_MS || lightboxFor || q.scrollTop === 0) return;
    const off = offscreen();
    if (!off.above.length && !off.below.length) return;
    q.scrollTo({ top: 0 });
    for (const el of tiles.values()) el.classList.remove("open");
  }

  $("#unseen").addEventListener("click", () => showUnseen());
  $("#more-below").addEventListener("click", () => showUnseen("below"));
  $("#more-above").addEventListener("click", () => showUnseen("above"));
  $("#lightbox").addEventListener("click", closeLightbox);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && lightboxFor) closeLightbox(); });
  for (const name of ["pointerdown", "keydown", "wheel", "touchstart"]) {
    window.addEventListener(name, () => { lastInput = Date.now(); }, { passive: true, capture: true });
  }
  let moreFrame = 0;
  const renderMoreSoon = () => {
    if (!moreFrame) moreFrame = requestAnimationFrame(() => { moreFrame = 0; renderMore(); });
  };
  $("#queue").addEventListener("scroll", renderMoreSoon, { passive: true });
  window.addEventListener("resize", renderMoreSoon);

  function start() {
    setConn("connecting");
    connect();
    tick();
    setInterval(tick, 1000);
  }
  start();
})();
