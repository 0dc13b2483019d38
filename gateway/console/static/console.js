// The operator console: board, map, actions, live stream, sound. No framework, no CDN.
// Every text from the gateway is put in with textContent (never innerHTML).
"use strict";
(function () {
  const API = "/console/api/";
  const ALERTING = new Set(["journaled", "notifying", "notified"]);
  const S = {
    me: null, lang: localStorage.getItem("console.lang") || null, alarms: new Map(),
    notices: [], selected: null, cursor: null, es: null, streamId: null,
    consoles: [], sound: "off", health: null, openTotal: 0, view: "board",
    responders: [], map: null, layers: {}, fetching: new Map(), offset: 0,
  };

  // -- small helpers -----------------------------------------------------------------
  function t(key, vars) {
    const dict = window.I18N[S.lang || "zh"] || window.I18N.zh;
    let s = dict[key] !== undefined ? dict[key] : (window.I18N.zh[key] !== undefined ? window.I18N.zh[key] : key);
    for (const [k, v] of Object.entries(vars || {})) s = s.replace("{" + k + "}", v);
    return s;
  }
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const $ = (id) => document.getElementById(id);
  function now() { return Date.now() / 1000 + S.offset; }
  function clockText(at) {
    if (!at) return "";
    const d = new Date(at * 1000);
    return d.toLocaleString(S.lang === "en" ? "en-GB" : "zh-CN", { hour12: false });
  }
  function since(at) {
    let s = Math.max(0, Math.floor(now() - at));
    const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
    return (hh ? hh + t("hours") + " " : "") + (hh || mm ? mm + t("minutes") + " " : "") + ss + t("seconds");
  }
  function dist(m) {
    if (m === null || m === undefined) return "";
    return m >= 1000 ? (m / 1000).toFixed(1) + " " + t("km") : Math.round(m) + " " + t("meters");
  }
  async function api(path, opts) {
    opts = opts || {};
    const init = { method: opts.method || "GET", credentials: "same-origin", headers: {} };
    if (opts.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    if (init.method === "POST" && S.me) init.headers["X-CSRF-Token"] = S.me.csrf;
    const res = await fetch(API + path, init);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (res.status === 401 && path !== "sign-in") { showSignIn(); throw new Error("signed out"); }
    if (!res.ok) { const err = new Error((data && data.error) || res.statusText); err.status = res.status; err.data = data; throw err; }
    return data;
  }
  function translatePage() {
    document.documentElement.lang = S.lang === "en" ? "en" : "zh-CN";
    document.querySelectorAll("[data-t]").forEach((el) => { el.textContent = t(el.dataset.t); });
    $("lang-button").textContent = S.lang === "en" ? "中文" : "EN";
    updateSoundButton();
  }
  function setLang(lang) { S.lang = lang; localStorage.setItem("console.lang", lang); translatePage(); renderAll(); }

  // -- sign-in ---------------------------------------------------------------------------
  function showSignIn() {
    closeStream();
    S.me = null;
    $("app").hidden = true;
    $("signin").hidden = false;
    translatePage();
    $("login").focus();
  }
  async function signIn(ev) {
    ev.preventDefault();
    $("signin-error").textContent = "";
    try {
      S.me = await api("sign-in", { method: "POST", body: { login: $("login").value, password: $("password").value } });
      $("password").value = "";
      await start();
    } catch (err) {
      const reason = err.data && err.data.error;
      $("signin-error").textContent = t(reason === "locked" || reason === "disabled" ? reason : "invalid");
    }
  }
  async function signOut() {
    try { await api("sign-out", { method: "POST", body: {} }); } catch (e) { /* signed out anyway */ }
    stopAllSound();
    showSignIn();
  }

  // -- start, board, stream ---------------------------------------------------------------
  async function start() {
    S.me = await api("me");
    if (!S.lang) S.lang = S.me.language || "zh";
    $("operator").textContent = S.me.name + " (" + S.me.login + ")";
    $("signin").hidden = true;
    $("app").hidden = false;
    translatePage();
    initMap();
    await loadMap();
    await loadBoard();
    await loadResponders();
    openStream();
  }
  async function loadBoard() {
    const b = await api("board");
    S.offset = b.now - Date.now() / 1000;
    S.alarms = new Map(b.alarms.map((a) => [a.alarm_id, a]));
    S.openTotal = b.open_total;
    S.notices = b.notices;
    S.consoles = b.consoles;
    S.health = b.health;
    S.cursor = b.cursor;
    renderAll();
  }
  function openStream() {
    closeStream();
    const es = new EventSource(API + "events?after=" + encodeURIComponent(S.cursor || ""));
    S.es = es;
    es.addEventListener("open", () => renderBanners());
    es.addEventListener("error", () => renderBanners());
    es.addEventListener("hello", (ev) => {
      const d = JSON.parse(ev.data);
      S.streamId = d.stream_id; S.consoles = d.consoles;
      reportSound(); renderBanners();
    });
    es.addEventListener("resync", () => { loadBoard().catch(() => {}); loadResponders().catch(() => {}); });
    es.addEventListener("signed-out", () => showSignIn());
    es.addEventListener("change", (ev) => {
      const d = JSON.parse(ev.data);
      d.alarms.forEach(refreshAlarm);
      if (d.notices.length) refreshNotices();
      if (d.duty) loadResponders().catch(() => {});
      if (d.consoles) { S.consoles = d.consoles; renderBanners(); }
    });
  }
  function closeStream() { if (S.es) { S.es.close(); S.es = null; S.streamId = null; } }
  function refreshAlarm(id) {
    // One read per alarm at a time; a change during it reads once more afterwards.
    if (S.fetching.has(id)) { S.fetching.set(id, true); return; }
    S.fetching.set(id, false);
    api("alarms/" + encodeURIComponent(id)).then((a) => {
      const known = S.alarms.has(id);
      if (a.open) { S.alarms.set(id, a); if (!known) S.openTotal += 1; }
      else if (known) { S.alarms.delete(id); S.openTotal = Math.max(0, S.openTotal - 1); }
      renderBoard();
      if (S.selected === id) renderDetail();
      syncSound();
    }).catch(() => {}).finally(() => {
      const again = S.fetching.get(id);
      S.fetching.delete(id);
      if (again) refreshAlarm(id);
    });
  }
  async function refreshNotices() {
    S.notices = (await api("notices")).notices;
    renderBoard();
    if (S.view === "notices") renderNotices();
  }

  // -- rendering: board ---------------------------------------------------------------------
  function sortedAlarms() {
    return [...S.alarms.values()].sort((a, b) => (a.urgency - b.urgency)
      || ((ALERTING.has(b.state) ? 1 : 0) - (ALERTING.has(a.state) ? 1 : 0))
      || (a.received_at - b.received_at));
  }
  function renderAll() {
    if (!S.me) return;
    renderBoard(); renderDetail(); renderBanners();
    if (S.view === "notices") renderNotices();
    if (S.view === "responders") renderResponders();
  }
  function stateBadge(state) { return h("span", { class: "badge st-" + state }, t("st_" + state)); }
  function smsSummary(a) {
    const counts = {};
    a.notifications.filter((n) => n.kind === "escalation").forEach((n) => { counts[n.state] = (counts[n.state] || 0) + 1; });
    return Object.entries(counts).map(([s, n]) => h("span", { class: "pill ms-" + s }, t("ms_" + s) + " " + n));
  }
  function renderBoard() {
    const list = $("alarm-list");
    list.replaceChildren(...sortedAlarms().map((a) => {
      const e = a.elder;
      return h("article", {
        class: "card" + (ALERTING.has(a.state) ? " alerting" : "") + (S.selected === a.alarm_id ? " selected" : "") + (a.drill ? " drill" : ""),
        "data-alarm": a.alarm_id, tabindex: "0",
        onclick: () => select(a.alarm_id), onkeydown: (ev) => { if (ev.key === "Enter") select(a.alarm_id); },
      },
      h("div", { class: "card-top" },
        a.drill ? h("span", { class: "badge drill" }, t("drill")) : null,
        h("span", { class: "elder-name" }, e ? e.name : t("unknown_elder")),
        stateBadge(a.state),
        h("span", { class: "elapsed", "data-since": a.received_at }, since(a.received_at))),
      h("div", { class: "card-addr" }, e ? e.community + " · " + e.address : a.device_id),
      h("div", { class: "card-meta" }, a.alarm_id + " · " + a.device_id + " · " + a.channel,
        a.acknowledged_by ? " · " + t("acked_by") + ": " + a.acknowledged_by.replace("operator:", "") : ""),
      h("div", { class: "card-sms" }, smsSummary(a)));
    }));
    $("open-count").textContent = String(S.openTotal);
    if (S.openTotal > S.alarms.size) list.append(h("p", { class: "muted" }, t("more_open", { n: S.openTotal - S.alarms.size })));
    $("notice-count").textContent = S.notices.length ? "· " + S.notices.length + " " + t("notices_open") : "";
    $("notice-strip").replaceChildren(...[...S.notices].sort((a, b) => a.urgency - b.urgency || a.id - b.id).map((n) =>
      h("article", { class: "card notice sev-" + n.severity, "data-notice": n.id },
        h("div", { class: "card-top" }, h("span", { class: "badge" }, n.kind), h("span", {}, n.subject),
          h("span", { class: "elapsed", "data-since": n.at }, since(n.at))),
        h("div", {}, n.text),
        h("button", { class: "small", onclick: (ev) => { ev.stopPropagation(); ackNotice(n); } }, t("ack_notice")))));
    renderAlarmMarkers();
  }
  function select(id) {
    S.selected = id;
    renderBoard(); renderDetail();
    const a = S.alarms.get(id);
    if (a && a.elder && S.map) S.map.setView([a.elder.lat, a.elder.lon], Math.max(S.map.getZoom(), 15));
  }
  function renderDetail() {
    const box = $("detail");
    const a = S.selected ? S.alarms.get(S.selected) : null;
    if (!a) { box.replaceChildren(h("p", { class: "muted" }, t("pick_alarm"))); renderChosenLines(null); return; }
    const e = a.elder;
    const rows = a.notifications.map((n) => h("tr", { class: "ms-" + n.state },
      h("td", {}, n.name), h("td", {}, t("role_" + n.role)), h("td", {}, n.phone),
      h("td", {}, n.kind === "escalation" ? t("wave") + " " + n.wave : n.kind),
      h("td", {}, h("span", { class: "pill ms-" + n.state }, t("ms_" + n.state))),
      h("td", {}, n.latency_ms !== null ? (n.latency_ms / 1000).toFixed(2) + " " + t("seconds") : "")));
    const calls = a.calls.map((c) => h("tr", {}, h("td", {}, c.name), h("td", {}, t("role_" + c.role)),
      h("td", {}, c.phone), h("td", {}, t("wave") + " " + c.wave), h("td", {}, c.state), h("td", {}, c.digits || "")));
    box.replaceChildren(...[
      h("div", { class: "detail-head" },
        h("h2", {}, e ? e.name : t("unknown_elder"), " ", stateBadge(a.state)),
        h("div", { class: "actions" },
          h("button", { class: "primary", id: "ack-button", disabled: !ALERTING.has(a.state) && a.state !== "cancelled", onclick: () => doAck(a) }, t("ack")),
          h("button", { id: "resolve-button", onclick: () => doClose(a, false) }, t("resolve")),
          h("button", { id: "false-button", class: "danger", onclick: () => doClose(a, true) }, t("false_alarm")))),
      h("p", { class: "big" }, e ? e.community + " · " + e.address : a.device_id),
      h("p", {}, t("elapsed") + " ", h("b", { class: "elapsed", "data-since": a.received_at }, since(a.received_at)),
        " · " + clockText(a.received_at) + " · " + t("channel") + ": " + a.channel + " · " + t("presses") + ": " + a.presses),
      e && e.notes ? h("p", { class: "notes" }, e.notes) : null,
      e ? h("p", {}, t("contacts") + ": ", e.contacts.map((c) => c.name + (c.relation ? "（" + c.relation + "）" : "") + " " + c.phone).join("；") || t("none")) : null,
      a.acknowledged_by ? h("p", {}, t("acked_by") + ": " + a.acknowledged_by + " · " + clockText(a.acknowledged_at)) : null,
      h("h3", {}, t("recipients")),
      h("table", { class: "grid compact", id: "recipients" }, h("tbody", {}, rows)),
      calls.length ? [h("h3", {}, t("calls")), h("table", { class: "grid compact" }, h("tbody", {}, calls))] : null,
      h("h3", {}, t("nearby")),
      h("ul", { class: "nearby" }, a.nearby.responders.map((r) => h("li", {}, r.name + " · " + dist(r.distance_m),
        r.stale ? h("span", { class: "pill stale" }, t("stale")) : null, r.texted ? h("span", { class: "pill ms-accepted" }, t("texted")) : null))),
      h("h3", {}, t("facilities")),
      h("ul", { class: "nearby" }, a.nearby.facilities.map((f) => h("li", {}, f.name + " · " + dist(f.distance_m)))),
      h("button", { class: "link", onclick: () => showTimeline(a.alarm_id) }, t("timeline"))].flat().filter(Boolean));
    renderChosenLines(a);
  }

  // -- actions --------------------------------------------------------------------------------
  function confirmDialog(title, text, withNote) {
    return new Promise((resolve) => {
      const dlg = $("confirm");
      $("confirm-title").textContent = title;
      $("confirm-text").textContent = text;
      $("confirm-note-label").hidden = !withNote;
      $("confirm-note").value = "";
      dlg.onclose = () => resolve(dlg.returnValue === "ok" ? { note: $("confirm-note").value } : null);
      dlg.showModal();
    });
  }
  async function act(path, body) {
    try { return await api(path, { method: "POST", body: body || {} }); }
    catch (err) { alert(err.message); return null; }
  }
  async function doAck(a) {
    if (!(await confirmDialog(t("ack"), t("ack_confirm"), false))) return;
    await act("alarms/" + encodeURIComponent(a.alarm_id) + "/ack");
  }
  async function doClose(a, falseAlarm) {
    const ok = await confirmDialog(t(falseAlarm ? "false_alarm" : "resolve"), t(falseAlarm ? "false_confirm" : "resolve_confirm"), true);
    if (!ok) return;
    await act("alarms/" + encodeURIComponent(a.alarm_id) + (falseAlarm ? "/false-alarm" : "/resolve"), { note: ok.note });
  }
  async function ackNotice(n) { await act("notices/" + n.id + "/ack"); }
  async function setDuty(r, onDuty) {
    const state = t(onDuty ? "duty_on" : "duty_off");
    if (!(await confirmDialog(state, t("duty_confirm", { name: r.name, state: state }), false))) return;
    await act("responders/" + encodeURIComponent(r.id) + "/duty", { on_duty: onDuty });
  }

  // -- banners: connection, silent consoles, gateway health --------------------------------------
  function renderBanners() {
    const out = [];
    if (S.es && S.es.readyState !== 1) out.push(h("div", { class: "banner bad", id: "banner-conn" }, t("conn_lost")));
    if (S.sound !== "on") out.push(h("div", { class: "banner warn", id: "banner-self-silent" }, t("this_silent")));
    S.consoles.filter((c) => c.stream_id !== S.streamId && c.sound !== "on").forEach((c) =>
      out.push(h("div", { class: "banner warn silent-console" }, t("silent_console", { name: c.name, sound: c.sound === "muted" ? t("sound_muted") : "off" }))));
    if (S.health && S.health.status !== "ok") out.push(h("div", { class: "banner bad" }, t("journal_problem", { status: S.health.status + (S.health.problems && S.health.problems.length ? ": " + S.health.problems.join("; ") : "") })));
    $("banners").replaceChildren(...out);
  }

  // -- sound ------------------------------------------------------------------------------------
  const audio = new Audio();
  let playing = null;
  function updateSoundButton() {
    const b = $("sound-button");
    b.className = "sound " + S.sound;
    b.textContent = S.sound === "on" ? "🔔 " + t("sound_on") : S.sound === "muted" ? "🔕 " + t("sound_muted") : t("start_shift");
  }
  async function soundButton() {
    if (S.sound === "on") { S.sound = "muted"; stopAllSound(); }
    else {
      // The click is the gesture browsers need before a page may play sound.
      try { audio.src = "/console/static/silence.wav"; await audio.play(); S.sound = "on"; }
      catch (e) { S.sound = "off"; }
    }
    updateSoundButton(); reportSound(); renderBanners(); syncSound();
  }
  function reportSound() {
    if (!S.streamId) return;
    api("presence", { method: "POST", body: { stream_id: S.streamId, sound: S.sound } }).catch(() => {});
  }
  function stopAllSound() { audio.pause(); playing = null; }
  function syncSound() {
    if (S.sound !== "on") return;
    if (playing && S.alarms.has(playing) && S.alarms.get(playing).in_flight && ALERTING.has(S.alarms.get(playing).state)) return;
    stopAllSound();
    const next = sortedAlarms().find((a) => a.in_flight && ALERTING.has(a.state));
    if (!next) return;
    playing = next.alarm_id;
    audio.src = API + "alarms/" + encodeURIComponent(next.alarm_id) + "/alert.wav";
    audio.play().catch(() => { playing = null; });
  }
  audio.addEventListener("ended", () => {
    // Repeats until acknowledged, most urgent first, a short pause between rounds.
    const was = playing; playing = null;
    setTimeout(() => { if (!playing) syncSound(); }, was ? 2000 : 0);
  });

  // -- map -----------------------------------------------------------------------------------
  function initMap() {
    if (S.map || !window.L) return;
    S.map = L.map("map", { zoomControl: true, attributionControl: !!S.me.tile_url, preferCanvas: false });
    if (S.me.tile_url) L.tileLayer(S.me.tile_url, { attribution: S.me.tile_attribution, maxZoom: 19 }).addTo(S.map);
    S.layers.base = L.layerGroup().addTo(S.map);
    S.layers.responders = L.layerGroup().addTo(S.map);
    S.layers.alarms = L.layerGroup().addTo(S.map);
    S.layers.lines = L.layerGroup().addTo(S.map);
    S.map.setView([37.58, 118.55], 13);
  }
  async function loadMap() {
    if (!S.map) return;
    const m = await api("map");
    S.layers.base.clearLayers();
    if (m.district) {
      const gj = L.geoJSON(m.district, {
        style: (f) => f.properties.kind === "district" ? { color: "#1c3d5a", weight: 3, fill: false }
          : f.properties.kind === "community" ? { color: "#3b6e98", weight: 1.5, fillColor: "#dfe9f3", fillOpacity: 0.35 }
          : { color: "#7c98b3", weight: 0.8, dashArray: "4 4", fill: false },
        onEachFeature: (f, layer) => { if (f.properties.kind !== "district") layer.bindTooltip(f.properties.name, { sticky: true }); },
      }).addTo(S.layers.base);
      S.map.fitBounds(gj.getBounds());
    }
    m.elders.forEach((e) => L.circleMarker([e.lat, e.lon], { radius: 2, color: "#777", weight: 0, fillOpacity: 0.6 }).bindTooltip(e.name).addTo(S.layers.base));
    m.facilities.forEach((f) => L.circleMarker([f.lat, f.lon], { radius: 7, color: "#fff", weight: 2, fillColor: "#c62828", fillOpacity: 1 }).bindTooltip("✚ " + f.name).addTo(S.layers.base));
    if (!m.district && m.elders.length) S.map.fitBounds(L.latLngBounds(m.elders.map((e) => [e.lat, e.lon])));
  }
  async function loadResponders() {
    // The responders page lists everyone; the map's poll needs the shift only.
    S.responders = (await api(S.view === "responders" ? "responders" : "responders?on_duty=1")).responders;
    renderResponderMarkers();
    if (S.view === "responders") renderResponders();
  }
  function renderResponderMarkers() {
    if (!S.map) return;
    S.layers.responders.clearLayers();
    // A live fix: filled green; at the roster's base (no fresh fix): a small hollow ring.
    S.responders.filter((r) => r.on_duty).forEach((r) => L.circleMarker([r.lat, r.lon], {
      radius: r.stale ? 3.5 : 6, color: r.stale ? "#5f7d5f" : "#1b7f3b", weight: r.stale ? 1.2 : 2,
      fillColor: "#2ea44f", fillOpacity: r.stale ? 0 : 0.9, className: r.stale ? "responder stale" : "responder live",
    }).bindTooltip(r.name + (r.stale ? " (" + t("stale") + ")" : "")).addTo(S.layers.responders));
  }
  function renderAlarmMarkers() {
    if (!S.map) return;
    S.layers.alarms.clearLayers();
    sortedAlarms().forEach((a) => {
      if (!a.elder) return;
      const m = L.circleMarker([a.elder.lat, a.elder.lon], {
        radius: S.selected === a.alarm_id ? 13 : 10, color: "#fff", weight: 3,
        fillColor: ALERTING.has(a.state) ? "#e00000" : "#f59e0b", fillOpacity: 1, className: "alarm-marker",
      }).bindTooltip(a.elder.name + " · " + t("st_" + a.state), { permanent: S.selected === a.alarm_id });
      m.on("click", () => select(a.alarm_id));
      m.addTo(S.layers.alarms);
    });
  }
  function renderChosenLines(a) {
    if (!S.map) return;
    S.layers.lines.clearLayers();
    if (!a || !a.elder) return;
    a.nearby.responders.filter((r) => r.texted).forEach((r) =>
      L.polyline([[a.elder.lat, a.elder.lon], [r.lat, r.lon]], { color: "#1b7f3b", weight: 3, dashArray: "6 6" }).addTo(S.layers.lines));
    a.nearby.facilities.forEach((f) =>
      L.polyline([[a.elder.lat, a.elder.lon], [f.lat, f.lon]], { color: "#c62828", weight: 2, dashArray: "2 6" }).addTo(S.layers.lines));
  }

  // -- other views -------------------------------------------------------------------------------
  function showView(name) {
    S.view = name;
    document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.view === name));
    document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== "view-" + name; });
    if (name === "board" && S.map) setTimeout(() => S.map.invalidateSize(), 0);
    if (name === "notices") renderNotices();
    if (name === "devices") loadDevices();
    if (name === "responders") loadResponders();
    if (name === "history") loadHistory();
  }
  function renderNotices() {
    $("notices-body").replaceChildren(...S.notices.map((n) => h("tr", { "data-notice": n.id },
      h("td", {}, clockText(n.at)), h("td", {}, n.kind), h("td", {}, n.subject), h("td", {}, n.text),
      h("td", {}, h("button", { class: "small", onclick: () => ackNotice(n) }, t("ack_notice"))))));
  }
  async function loadDevices() {
    const d = await api("devices");
    $("devices-body").replaceChildren(...d.devices.map((x) => h("tr", { class: x.overdue || x.low_battery ? "warn" : "" },
      h("td", {}, x.device_id), h("td", {}, x.elder || ""), h("td", {}, x.community || ""),
      h("td", {}, x.last_seen ? clockText(x.last_seen) : t("never")),
      h("td", {}, x.battery_pct !== null && x.battery_pct !== undefined ? Math.round(x.battery_pct) + "%" : ""),
      h("td", {}, x.next_due ? clockText(x.next_due) : ""),
      h("td", {}, [x.overdue ? t("overdue") : null, x.low_battery ? t("low_battery") : null].filter(Boolean).join("、") || t("ok")))));
  }
  function renderResponders() {
    $("responders-body").replaceChildren(...S.responders.map((r) => h("tr", { "data-responder": r.id },
      h("td", {}, r.name), h("td", {}, r.community), h("td", {}, t("role_" + (r.role === "supervisor" ? "supervisor" : "responder")) + " · " + r.role),
      h("td", {}, r.on_duty ? t("yes") : t("no")),
      h("td", {}, r.fix_age_s === null ? t("never") : since(now() - r.fix_age_s), r.stale ? h("span", { class: "pill stale" }, t("stale")) : null),
      h("td", {}, r.busy_with.join(", ")),
      h("td", {}, h("button", { class: "small", onclick: () => setDuty(r, !r.on_duty) }, t(r.on_duty ? "duty_off" : "duty_on"))))));
  }
  function historyQuery() {
    const q = new URLSearchParams();
    for (const k of ["elder", "device", "day"]) { const v = $("history-" + k).value.trim(); if (v) q.set(k, v); }
    return q.toString();
  }
  async function loadHistory(ev) {
    if (ev) ev.preventDefault();
    const q = historyQuery();
    $("history-csv").href = API + "history.csv" + (q ? "?" + q : "");
    const d = await api("history" + (q ? "?" + q : ""));
    $("history-body").replaceChildren(...d.alarms.map((a) => h("tr", { class: "clickable", "data-alarm": a.alarm_id, onclick: () => showTimeline(a.alarm_id) },
      h("td", {}, a.received_at_local.replace("T", " ")), h("td", {}, a.elder || a.elder_id, a.drill ? " [" + t("drill") + "]" : ""),
      h("td", {}, a.community || ""), h("td", {}, a.device_id), h("td", {}, t("st_" + a.state)),
      h("td", {}, (a.acknowledged_by || "").replace("operator:", "")), h("td", {}, a.ack_s !== null ? a.ack_s + " " + t("seconds") : ""))));
  }
  async function showTimeline(id) {
    if (S.view !== "history") showView("history");
    const a = await api("alarms/" + encodeURIComponent(id));
    const e = a.elder;
    $("timeline").replaceChildren(
      h("h3", {}, t("timeline") + " · " + (e ? e.name : a.device_id) + " · " + a.alarm_id),
      h("ol", { class: "events" }, a.timeline.map((r) => h("li", {},
        h("span", { class: "t" }, "+" + r.t_s.toFixed(2) + " " + t("seconds")),
        h("span", { class: "ev" }, (t("ev_" + r.event) !== "ev_" + r.event ? t("ev_" + r.event) : r.event)
          + (r.kind && r.kind !== "escalation" ? " · " + t("kind_" + r.kind) : "")),
        h("span", { class: "what" }, [r.name ? r.name + (r.role ? "（" + t("role_" + r.role) + "）" : "") : "", r.detail].filter(Boolean).join(" "))))));
    $("timeline").scrollIntoView({ block: "nearest" });
  }
  async function loadReport(ev) {
    if (ev) ev.preventDefault();
    const day = $("report-day").value;
    const q = day ? "?day=" + encodeURIComponent(day) : "";
    $("report-csv").href = API + "report.csv" + q;
    const d = await api("report" + q);
    const rows = [];
    (function walk(obj, prefix) {
      for (const [k, v] of Object.entries(obj)) {
        if (v && typeof v === "object" && !Array.isArray(v)) walk(v, prefix + k + ".");
        else rows.push(h("tr", {}, h("td", {}, prefix + k), h("td", {}, Array.isArray(v) ? JSON.stringify(v) : String(v))));
      }
    })(d, "");
    $("report").replaceChildren(h("table", { class: "grid compact" }, h("tbody", {}, rows)));
  }

  // -- wiring ------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", signIn);
    document.querySelectorAll("[data-lang]").forEach((b) => b.addEventListener("click", () => setLang(b.dataset.lang)));
    $("lang-button").addEventListener("click", () => setLang(S.lang === "en" ? "zh" : "en"));
    $("signout-button").addEventListener("click", signOut);
    $("sound-button").addEventListener("click", soundButton);
    document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => showView(b.dataset.view)));
    $("history-form").addEventListener("submit", loadHistory);
    $("report-form").addEventListener("submit", loadReport);
    setInterval(() => document.querySelectorAll("[data-since]").forEach((el) => { el.textContent = since(Number(el.dataset.since)); }), 1000);
    setInterval(() => { if (S.me) loadResponders().catch(() => {}); }, 15000);
    setInterval(() => { if (S.me) renderBanners(); }, 2000);
    translatePage();
    start().catch(() => showSignIn());
  });
})();
