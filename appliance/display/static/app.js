/* CT triage screen. Fed by Server-Sent Events from `ctriage display` (/events): a snapshot on every (re)connect,
   then study / remove / device / link / ping events. Payload values are only ever set as text (never as HTML). */
"use strict";
(() => {
  const PING_MS = 5000;            // the server pings this often; silence for 3 pings means the link is dead
  const FLAGS = {
    positive: { word: "POSITIVE", action: "ISOLATE NOW", icon: "i-positive" },
    negative: { word: "NEGATIVE", action: "no COVID-19 pattern found", icon: "i-negative" },
    pending: { word: "ANALYSING", action: "scan in progress — wait for result", icon: "i-pending" },
    indeterminate: { word: "INDETERMINATE", action: "review the scan", icon: "i-indeterminate" },
  };
  const QUAD_CLASS = { "upper-left": "ul", "upper-right": "ur", "lower-left": "ll", "lower-right": "lr" };

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
      if (!wasPositive && !quiet && !s.acked) chime();
    } else {
      positivesKnown.delete(s.id);
    }
    if (s.acked || (s.ack && s.ack.pending)) failed.delete(s.id);
  }

  function expired(s) {
    const t = Date.parse(s.scanned || s.updated);
    return !Number.isNaN(t) && now() - t > config.expire_minutes * 60000;
  }

  function sorted() {
    return [...studies.values()].filter((s) => !expired(s))
      .sort((a, b) => (Date.parse(b.scanned) - Date.parse(a.scanned)) || (a.id < b.id ? -1 : 1));
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
        if (!firstSnapshot && conn === "live") el.classList.add("new");
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
    renderBanner();
  }

  function updateTile(el, s) {
    const f = FLAGS[s.flag] || FLAGS.pending;
    const dev = devices.get(s.device);
    const offline = dev && dev.state === "offline";
    el.className = el.className.split(" ").filter((c) => !/^(flag-|state-|unacked|device-offline)/.test(c)).join(" ");
    el.classList.add("flag-" + s.flag, "state-" + s.state);
    if (s.flag === "positive" && !s.acked) el.classList.add("unacked");
    if (offline) el.classList.add("device-offline");
    el.dataset.flag = s.flag;
    el.dataset.state = s.state;
    el.dataset.acked = String(!!s.acked);

    setIcon($(".flag-icon", el), f.icon);
    $(".flag-word", el).textContent = f.word;
    let action = f.action;
    if (s.flag === "pending" && s.result === "negative") action = "no lesion run so far — wait";
    else if (s.flag === "negative" && s.focal) action = "radiologist to read";
    $(".flag-action", el).textContent = action;

    let strip;
    if (s.state === "final") {
      const n = (s.series || []).length;
      strip = "FINAL" + (n > 1 ? " · " + n + " series" : " · scan complete");
    } else {
      strip = s.flag === "positive" ? "PROVISIONAL · final follows" : "PROVISIONAL · scan arriving";
    }
    $(".strip-text", el).textContent = strip;

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

    const where = $(".where", el);
    where.classList.toggle("hidden", !(s.quadrants && s.quadrants.length));
    for (const q of el.querySelectorAll(".quad .q")) q.classList.remove("on");
    for (const q of s.quadrants || []) {
      const cell = $(".quad ." + QUAD_CLASS[q], el);
      if (cell) cell.classList.add("on");
    }
    $(".where-text", el).textContent = (s.anatomy || []).join(", ");

    const c = s.counts || {};
    let detail = "";
    if (s.flag === "indeterminate" && s.reason) {
      detail = s.reason;
    } else if (s.evidence) {
      const e = s.evidence;
      detail = "slices " + (e.first_slice + 1) + "–" + (e.last_slice + 1) + " · " + e.run + " in a row";
    } else if (s.focal) {
      const e = s.focal;
      detail = "focal lesion · slices " + (e.first_slice + 1) + "–" + (e.last_slice + 1);
    } else if (c.slices !== undefined) {
      detail = c.slices + " slices" + (s.state === "provisional" ? " so far" : "") + " · "
        + (c.lesion_slices || 0) + " with lesion";
    } else {
      detail = "waiting for the verdict";
    }
    $(".detail", el).textContent = detail;
    $(".detail", el).classList.toggle("focal", !s.evidence && !!s.focal);
    $(".model", el).textContent = (s.bundles || []).length
      ? "model " + s.bundles.map((b) => b.name + " " + b.version).join(" · ") : "";

    renderKey(el, s);
    renderAck(el, s);
  }

  function renderKey(el, s) {
    const img = $(".key-img", el), canvas = $(".key-canvas", el), none = $(".key-none", el);
    if (s.image) {
      if (img.getAttribute("src") !== s.image) img.setAttribute("src", s.image);
      img.classList.remove("hidden");
      canvas.classList.add("hidden");
      none.classList.add("hidden");
      return;
    }
    img.classList.add("hidden");
    img.removeAttribute("src");
    if (s.boxes && s.boxes.length) {
      const key = JSON.stringify(s.boxes);
      if (canvas.dataset.key !== key) { drawBoxes(canvas, s.boxes); canvas.dataset.key = key; }
      canvas.classList.remove("hidden");
      none.classList.add("hidden");
      return;
    }
    canvas.classList.add("hidden");
    none.classList.remove("hidden");
    none.textContent = s.flag === "negative" ? (s.focal ? "Key image pending" : "No lesion found")
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
    g.fillStyle = "#b9c1cc";
    g.font = "bold 30px sans-serif";
    g.fillText("R", 14, H / 2 - 12);
    g.fillText("L", W - 34, H / 2 - 12);
    g.font = "24px sans-serif";
    g.fillText("lesion boxes (no key image)", 14, H - 18);
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
    else renderDevices();
  }

  $("#unseen").addEventListener("click", () => {
    const first = sorted().find((s) => s.flag === "positive" && !s.acked);
    if (first && tiles.get(first.id)) tiles.get(first.id).scrollIntoView({ behavior: "smooth", block: "center" });
  });

  function start() {
    setConn("connecting");
    connect();
    tick();
    setInterval(tick, 1000);
  }
  start();
})();
