// The live page of a dawnchorus base station. It opens one server-sent event
// stream (/api/events): the first event is a snapshot of everything, and each
// later event is one change. The browser reconnects a broken stream by itself,
// and the server then sends a fresh snapshot. Data is inserted as text, never
// as HTML, and the plots are SVG drawn here: the page loads nothing from other hosts.
"use strict";

const DETECTION_ROWS = 200;   // rows in the detections table; the server keeps more
const ROUNDS = 500;           // rounds and heads per site, as the server keeps them
const ROUND_ROWS = 50;        // rows in a site's round table
const COUNT_DAYS = 7;         // day columns in the species tables
const KEPT_DAYS = 31;         // days of counts kept, as the server keeps them
const SVG = "http://www.w3.org/2000/svg";

const state = {
  station: "",
  detections: [],
  recorders: new Map(),
  sites: new Map(),
  counts: {},            // day -> site -> label -> count
  countsSince: null,
  clockOffset: 0,        // server time minus browser time, in seconds
};

// Helpers ------------------------------------------------------------------

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svgElement(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
  return node;
}

function pad(number) {
  return String(number).padStart(2, "0");
}

function clock(seconds) {
  const date = new Date(seconds * 1000);
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function dateTime(seconds) {
  const date = new Date(seconds * 1000);
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${clock(seconds)}`;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const age = Math.max(0, Date.now() / 1000 + state.clockOffset - seconds);
  if (age < 60) return `${Math.round(age)} s ago`;
  if (age < 3600) return `${Math.round(age / 60)} min ago`;
  if (age < 86400) return `${(age / 3600).toFixed(1)} h ago`;
  return `${(age / 86400).toFixed(1)} days ago`;
}

function number(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function splitLabel(label) {
  const cut = label.indexOf("_");
  return cut < 0 ? [label, label] : [label.slice(0, cut), label.slice(cut + 1)];
}

function decisionClass(round) {
  if (!round.accepted) return "decision-blocked";
  return round.published ? "decision-published" : "decision-discarded";
}

// Rendering is batched: an event marks parts dirty, and one timer redraws them.
const dirty = new Set();
let renderTimer = null;

function schedule(part) {
  dirty.add(part);
  if (renderTimer === null) renderTimer = setTimeout(render, 100);
}

function render() {
  renderTimer = null;
  const parts = new Set(dirty);
  dirty.clear();
  if (parts.has("detections")) renderDetections();
  if (parts.has("recorders")) renderRecorders();
  for (const part of parts) {
    if (part.startsWith("site:")) renderSite(part.slice(5));
  }
  if (parts.has("counts")) renderCounts();
}

// Detections -------------------------------------------------------------------

function detectionRow(detection, fresh) {
  const [scientific, common] = [detection.scientific_name, detection.common_name];
  return element("tr", {class: fresh ? "detection new" : "detection", "data-label": detection.label},
    element("td", {title: dateTime(detection.time)}, clock(detection.time)),
    element("td", {}, element("span", {class: "common"}, common), " ",
            element("span", {class: "scientific"}, scientific)),
    element("td", {class: "number"}, number(detection.confidence, 2)),
    element("td", {}, detection.device),
    element("td", {}, detection.site),
    element("td", {class: "number"}, `v${detection.head_version}`));
}

function renderDetections() {
  const body = document.querySelector("#detections tbody");
  const rows = state.detections.slice(-DETECTION_ROWS).reverse();
  body.replaceChildren(...(rows.length ? rows.map((detection) => detectionRow(detection, detection.fresh))
    : [element("tr", {}, element("td", {colspan: 6, class: "empty"}, "no detections yet"))]));
  for (const detection of rows) detection.fresh = false;
}

// Recorders ---------------------------------------------------------------------

function renderRecorders() {
  const body = document.querySelector("#recorders tbody");
  const recorders = [...state.recorders.values()].sort((a, b) => a.device.localeCompare(b.device));
  if (!recorders.length) {
    body.replaceChildren(element("tr", {}, element("td", {colspan: 8, class: "empty"}, "no recorder has reported")));
    return;
  }
  body.replaceChildren(...recorders.map((recorder) => element("tr", {class: "recorder", "data-device": recorder.device},
    element("td", {}, recorder.device),
    element("td", {}, recorder.site),
    element("td", {class: `state state-${recorder.state}`}, recorder.state),
    element("td", {class: "last-seen", "data-time": recorder.last_seen, title: dateTime(recorder.last_seen)},
            ago(recorder.last_seen)),
    element("td", {class: "number"}, recorder.head_version === null ? "–" : `v${recorder.head_version}`),
    element("td", {class: "number"}, recorder.windows),
    element("td", {class: "number"}, recorder.queue_depth),
    element("td", {class: recorder.queue_dropped ? "number dropped" : "number"}, recorder.queue_dropped))));
}

function refreshAges() {
  for (const cell of document.querySelectorAll("td.last-seen")) {
    cell.textContent = ago(Number(cell.dataset.time));
  }
}

// Sites -----------------------------------------------------------------------------

// Texts of ascending axis ticks, with at least as many decimals as the smallest gap between two ticks
// needs, so that distinct ticks read differently, and one more below 1 because ticks fall on arbitrary
// values. Ticks that need more than 4 decimals are written in scientific notation (1.4e-4), which stays
// narrow enough for the axis.
function tickLabels(ticks) {
  const gaps = ticks.slice(1).map((value, index) => value - ticks[index]);
  const gap = Math.min(...gaps);
  const decimals = gap > 0 && Number.isFinite(gap) ? Math.max(0, Math.ceil(-Math.log10(gap))) : 4;
  if (decimals === 0) return ticks.map((value) => value.toFixed(0));
  if (decimals <= 4) return ticks.map((value) => value.toFixed(Math.min(4, decimals + 1)));
  const exponent = Math.floor(Math.log10(Math.max(...ticks.map(Math.abs))));
  return ticks.map((value) => value.toExponential(Math.max(0, decimals + exponent)));
}

// One small line chart: series of [time, value] points, the y axis fitted to the data.
function lineChart(title, series, markers) {
  const width = 320, height = 130, left = 42, right = 8, top = 8, bottom = 20;
  const points = series.flatMap((line) => line.points).concat(markers || []);
  const box = element("div", {class: "chart"}, element("div", {class: "chart-title"}, title));
  if (points.length === 0) {
    box.append(element("div", {class: "empty"}, "no rounds yet"));
    return box;
  }
  let [t0, t1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (t1 === t0) { t0 -= 1; t1 += 1; }
  if (y1 - y0 < 1e-6) { y0 -= 0.01 + Math.abs(y0) * 0.05; y1 += 0.01 + Math.abs(y1) * 0.05; }
  const margin = (y1 - y0) * 0.08;
  y0 -= margin; y1 += margin;
  const x = (t) => left + (t - t0) / (t1 - t0) * (width - left - right);
  const y = (v) => top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom);

  const svg = svgElement("svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title});
  svg.append(svgElement("line", {class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom}));
  svg.append(svgElement("line", {class: "axis", x1: left, x2: left, y1: top, y2: height - bottom}));
  const ticks = [y0 + margin, (y0 + y1) / 2, y1 - margin];
  const tickTexts = tickLabels(ticks);
  ticks.forEach((value, index) => {
    const label = svgElement("text", {class: "tick", x: left - 4, y: y(value) + 3, "text-anchor": "end"});
    label.textContent = tickTexts[index];
    svg.append(label);
    svg.append(svgElement("line", {class: "axis", x1: left - 2, x2: left, y1: y(value), y2: y(value)}));
  });
  for (const [value, anchor] of [[t0, "start"], [t1, "end"]]) {
    const label = svgElement("text", {class: "tick", x: x(value), y: height - 6, "text-anchor": anchor});
    label.textContent = clock(value);
    svg.append(label);
  }
  series.forEach((line, index) => {
    if (!line.points.length) return;
    svg.append(svgElement("polyline", {class: `series-${index}`,
      points: line.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}));
    if (line.points.length === 1) {
      svg.append(svgElement("circle", {class: `series-${index}`, r: 2.5, cx: x(line.points[0][0]), cy: y(line.points[0][1])}));
    }
  });
  for (const point of markers || []) {
    svg.append(svgElement("circle", {class: "blocked", r: 3, cx: x(point[0]), cy: y(point[1])}));
  }
  box.append(svg);
  const legend = element("div", {class: "legend"});
  series.forEach((line, index) => legend.append(
    element("span", {}, element("span", {class: `swatch series-${index}`}), line.name)));
  if (markers && markers.length) {
    legend.append(element("span", {}, element("span", {class: "swatch blocked"}), "blocked by the collapse guard"));
  }
  box.append(legend);
  return box;
}

function statSeries(rounds, name, onlyAccepted) {
  return rounds.filter((round) => round.stats[name] !== null && round.stats[name] !== undefined
                                  && (!onlyAccepted || round.accepted))
    .map((round) => [round.time, round.stats[name]]);
}

function siteCharts(site) {
  const rounds = site.rounds_history;
  const blocked = rounds.filter((round) => !round.accepted);
  const blockedAt = (name) => blocked.filter((round) => round.stats[name] !== null && round.stats[name] !== undefined)
    .map((round) => [round.time, round.stats[name]]);
  return element("div", {class: "charts"},
    lineChart("Mean top score on the buffer", [
      {name: "adapted head", points: statSeries(rounds, "candidate_mean_top_score", true)},
      {name: "source head", points: statSeries(rounds, "source_mean_top_score", false)},
    ], blockedAt("candidate_mean_top_score")),
    lineChart("Mean pseudo-label", [
      {name: "pseudo-label", points: statSeries(rounds, "mean_pseudo_label", false)},
      {name: "teacher score", points: statSeries(rounds, "mean_teacher_score", false)},
    ]),
    lineChart("Share of windows", [
      {name: "top class changed by neighbours", points: statSeries(rounds, "pseudo_label_top_changed", false)},
      {name: "with a mutual neighbour", points: statSeries(rounds, "windows_with_mutual_neighbour", false)},
    ]),
    lineChart("Student loss", [{name: "binary cross-entropy", points: statSeries(rounds, "loss", false)}]));
}

function headsTable(site) {
  const heads = site.heads.slice().reverse();
  if (!heads.length) return element("div", {class: "empty"}, "recorders run the source head (v0)");
  return element("div", {class: "scroll"}, element("table", {class: "heads"},
    element("thead", {}, element("tr", {}, element("th", {}, "Head"), element("th", {}, "Published"),
      element("th", {}, "Parent"), element("th", {}, "Kind"))),
    element("tbody", {}, ...heads.map((head) => element("tr", {},
      element("td", {}, `v${head.version}`),
      element("td", {title: dateTime(head.time)}, dateTime(head.time)),
      element("td", {}, parentText(head)),
      element("td", {}, head.rollback ? `rollback from v${head.parent}`
        : `${head.precision} ${head.size ? Math.round(head.size / 1024) + " KiB" : ""}`))))));
}

function parentText(head) {
  if (head.rollback) return "–";
  return head.parent ? `v${head.parent}` : "source";
}

function roundsTable(site) {
  const rounds = site.rounds_history.slice(-ROUND_ROWS).reverse();
  if (!rounds.length) return element("div", {class: "empty"}, "no round yet");
  return element("div", {class: "scroll"}, element("table", {class: "rounds"},
    element("thead", {}, element("tr", {}, element("th", {}, "Time"), element("th", {}, "Candidate"),
      element("th", {class: "number"}, "Buffer"), element("th", {class: "number"}, "Top score"),
      element("th", {}, "Collapse guard"))),
    element("tbody", {}, ...rounds.map((round) => element("tr", {},
      element("td", {title: dateTime(round.time)}, clock(round.time)),
      element("td", {}, `v${round.version}`),
      element("td", {class: "number"}, round.buffer_size),
      element("td", {class: "number"}, `${number(round.stats.candidate_mean_top_score, 3)} / ${number(round.stats.source_mean_top_score, 3)}`),
      element("td", {class: decisionClass(round)}, round.accepted ? round.decision : `blocked: ${round.decision}`))))));
}

function siteId(name) {
  return `site-${name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
}

function renderSite(name) {
  const site = state.sites.get(name);
  const container = document.getElementById("sites");
  if (!site) return;
  const card = element("div", {class: "site", id: siteId(name), "data-site": name},
    element("h3", {}, `Site ${name}`),
    element("div", {class: "site-summary"},
      element("span", {}, "head ", element("b", {class: "head-version"}, `v${site.version}`)),
      element("span", {}, "buffer ", element("b", {class: "buffer-size"}, site.buffer_size), " embeddings"),
      element("span", {}, "rounds ", element("b", {class: "rounds-count"}, site.rounds), " since start, ",
              element("b", {}, site.blocked), " blocked"),
      element("span", {}, "acknowledged ", element("b", {}, site.acks)),
      site.last_decision ? element("span", {}, "last round: ",
        element("b", {class: site.last_decision === "published" ? "decision-published" : "decision-blocked"},
                site.last_decision)) : null),
    siteCharts(site),
    element("div", {class: "tables"},
      element("div", {}, element("h3", {}, "Head versions"), headsTable(site)),
      element("div", {}, element("h3", {}, "Rounds and the collapse guard's decisions"), roundsTable(site))));
  for (const placeholder of container.querySelectorAll(":scope > .empty")) placeholder.remove();
  const old = document.getElementById(siteId(name));
  if (old) {
    old.replaceWith(card);
  } else {
    const names = [...state.sites.keys()].sort();
    const next = names.slice(names.indexOf(name) + 1).map((other) => document.getElementById(siteId(other))).find(Boolean);
    container.insertBefore(card, next || null);
  }
}

function renderSites() {
  document.getElementById("sites").replaceChildren();
  if (!state.sites.size) {
    document.getElementById("sites").append(element("div", {class: "empty"}, "no site has sent embeddings yet"));
  }
  for (const name of [...state.sites.keys()].sort()) renderSite(name);
}

// Species counts -------------------------------------------------------------------

function renderCounts() {
  const container = document.getElementById("counts");
  const days = Object.keys(state.counts).sort().slice(-COUNT_DAYS);
  const sites = [...new Set(days.flatMap((day) => Object.keys(state.counts[day])))].sort();
  document.getElementById("counts-since").textContent = state.countsSince === null ? ""
    : `Counted from detections since ${dateTime(state.countsSince)} (days of the base station's clock), the newest ${COUNT_DAYS} days shown.`;
  if (!sites.length) {
    container.replaceChildren(element("div", {class: "empty"}, "no detections yet"));
    return;
  }
  container.replaceChildren(...sites.map((site) => {
    const totals = new Map();
    for (const day of days) {
      for (const [label, count] of Object.entries(state.counts[day][site] || {})) {
        totals.set(label, (totals.get(label) || 0) + count);
      }
    }
    const labels = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || a.localeCompare(b));
    return element("div", {class: "counts-site", "data-site": site},
      element("h3", {}, `Site ${site}`),
      element("div", {class: "scroll"}, element("table", {class: "counts"},
        element("thead", {}, element("tr", {}, element("th", {}, "Species"),
          ...days.map((day) => element("th", {class: "number"}, day.slice(5))),
          element("th", {class: "number"}, "Total"))),
        element("tbody", {}, ...labels.map((label) => {
          const [scientific, common] = splitLabel(label);
          return element("tr", {"data-label": label},
            element("td", {}, element("span", {class: "common"}, common), " ", element("span", {class: "scientific"}, scientific)),
            ...days.map((day) => element("td", {class: "number"}, (state.counts[day][site] || {})[label] || "")),
            element("td", {class: "number"}, totals.get(label)));
        })))));
  }));
}

// Events ---------------------------------------------------------------------------

function loadSnapshot(snapshot) {
  state.station = snapshot.station;
  state.clockOffset = snapshot.time - Date.now() / 1000;
  state.detections = snapshot.detections;
  state.recorders = new Map(snapshot.recorders.map((recorder) => [recorder.device, recorder]));
  state.sites = new Map(Object.entries(snapshot.sites));
  state.counts = snapshot.counts;
  state.countsSince = snapshot.counts_since;
  document.getElementById("station").textContent = `base station ${snapshot.station}`;
  renderDetections();
  renderRecorders();
  renderSites();
  renderCounts();
}

function site(name) {
  if (!state.sites.has(name)) {
    state.sites.set(name, {site: name, version: 0, buffer_size: 0, embeddings: 0, rounds: 0, blocked: 0, published: 0,
      acks: 0, head_rejections: 0, detections: 0, last_decision: "", rounds_history: [], heads: []});
  }
  return state.sites.get(name);
}

const handlers = {
  snapshot: loadSnapshot,
  detection(detection) {
    detection.fresh = true;
    state.detections.push(detection);
    if (state.detections.length > 2 * DETECTION_ROWS) state.detections.splice(0, DETECTION_ROWS);
    schedule("detections");
    if (detection.day === null) return;  // a time the server could not place on a day is not counted
    const days = Object.keys(state.counts).sort();
    if (!(detection.day in state.counts) && days.length >= KEPT_DAYS) delete state.counts[days[0]];
    const day = (state.counts[detection.day] = state.counts[detection.day] || {});
    const labels = (day[detection.site] = day[detection.site] || {});
    labels[detection.label] = (labels[detection.label] || 0) + 1;
    if (state.countsSince === null || detection.time < state.countsSince) state.countsSince = detection.time;
    schedule("counts");
  },
  recorder(recorder) {
    state.recorders.set(recorder.device, recorder);
    schedule("recorders");
  },
  site(summary) {
    Object.assign(site(summary.site), summary);
    schedule(`site:${summary.site}`);
  },
  site_history(history) {
    state.sites.set(history.site, history);
    schedule(`site:${history.site}`);
  },
  round(round) {
    const history = site(round.site).rounds_history;
    history.push(round);
    if (history.length > ROUNDS) history.shift();
    schedule(`site:${round.site}`);
  },
  head(head) {
    const entry = site(head.site);
    entry.heads.push(head);
    if (entry.heads.length > ROUNDS) entry.heads.shift();
    entry.version = head.version;
    schedule(`site:${head.site}`);
  },
};

function connect() {
  const connection = document.getElementById("connection");
  const events = new EventSource("api/events");
  events.addEventListener("open", () => {
    connection.textContent = "live";
    connection.className = "connection live";
  });
  events.addEventListener("error", () => {
    connection.textContent = "reconnecting";
    connection.className = "connection lost";
    // The browser retries by itself unless the server responded with an error (e.g. 503: too many pages).
    if (events.readyState === EventSource.CLOSED) setTimeout(connect, 10000);
  });
  for (const [kind, handle] of Object.entries(handlers)) {
    events.addEventListener(kind, (event) => {
      try {
        handle(JSON.parse(event.data));
      } catch (error) {
        console.error(`live page: cannot apply a ${kind} event`, error);
      }
    });
  }
}

connect();
setInterval(refreshAges, 1000);
